"""Prometheus series of the control plane, on the plane's own registry (like each agent's).

Served by :func:`tiermem.metrics.start_metrics` when ``metrics_listen`` is set.
Label values are Enums, so a series is named the same where it is counted and
where it is documented (docs/metrics.md).
"""

from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tiermem.metrics import service_registry

__all__ = ["ControlPlaneMetrics", "FailureReason", "OrderResult", "SloDirection"]


class OrderResult(enum.Enum):
    """``result`` of tiermem_cp_cycle_orders_total."""

    OK = "ok"
    ERROR = "error"
    CLAIMED_ELSEWHERE = "claimed_elsewhere"
    SKIPPED = "skipped"


class FailureReason(enum.Enum):
    """``reason`` of tiermem_cp_order_failures_total."""

    UNAVAILABLE = "unavailable"
    AGENT_ERROR = "agent_error"
    CYCLE_ERROR = "cycle_error"


class SloDirection(enum.Enum):
    """``direction`` of tiermem_cp_slo_adjustments_total: relax the policy, or tighten it back."""

    BACKOFF = "backoff"
    TIGHTEN = "tighten"


class ControlPlaneMetrics:
    """The control plane's series (docs/metrics.md), on ``registry`` (default: a new service registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else service_registry()
        r = self.registry
        self.scheduler_lag = Histogram(
            "tiermem_cp_scheduler_lag_seconds",
            "Actual start of a scheduled cycle order minus its planned start.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.cycle_orders = Counter(
            "tiermem_cp_cycle_orders_total",
            "Cycle orders by outcome (ok, error, claimed_elsewhere, skipped).",
            ["result"],
            registry=r,
        )
        self.order_failures = Counter(
            "tiermem_cp_order_failures_total",
            "Cycle orders that failed, by reason (unavailable, agent_error, cycle_error).",
            ["reason"],
            registry=r,
        )
        self.nodes_up = Gauge("tiermem_cp_nodes_up", "Nodes with a valid lease.", registry=r)
        self.vms = Gauge("tiermem_cp_vms", "VMs registered.", registry=r)
        self.slo_adjustments = Counter(
            "tiermem_cp_slo_adjustments_total",
            "Policy adjustments made for the promotion-rate SLO.",
            ["direction"],
            registry=r,
        )

    def order(self, result: OrderResult, n: int = 1) -> None:
        """Count ``n`` cycle orders that ended with ``result``."""
        self.cycle_orders.labels(result.value).inc(n)

    def failure(self, reason: FailureReason) -> None:
        """Count one failed order (``error`` result and its reason)."""
        self.cycle_orders.labels(OrderResult.ERROR.value).inc()
        self.order_failures.labels(reason.value).inc()

    def slo_adjustment(self, direction: SloDirection) -> None:
        """Count one SLO policy adjustment."""
        self.slo_adjustments.labels(direction.value).inc()
