"""Prometheus series of the control plane (on the process-wide default registry).

Served by :func:`tiermem.metrics.start_metrics` when ``metrics_listen`` is set.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["CYCLE_ORDERS", "NODES_UP", "ORDER_FAILURES", "SCHEDULER_LAG", "SLO_ADJUSTMENTS", "VMS"]

SCHEDULER_LAG = Histogram(
    "tiermem_cp_scheduler_lag_seconds",
    "Actual start of a scheduled cycle order minus its planned start.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
CYCLE_ORDERS = Counter(
    "tiermem_cp_cycle_orders_total",
    "Cycle orders by outcome (ok, error, claimed_elsewhere, skipped).",
    ["result"],
)
ORDER_FAILURES = Counter(
    "tiermem_cp_order_failures_total",
    "Cycle orders that failed, by reason (unavailable, agent_error, cycle_error).",
    ["reason"],
)
NODES_UP = Gauge("tiermem_cp_nodes_up", "Nodes with a valid lease.")
VMS = Gauge("tiermem_cp_vms", "VMs registered.")
SLO_ADJUSTMENTS = Counter(
    "tiermem_cp_slo_adjustments_total", "Policy adjustments made for the promotion-rate SLO.", ["direction"]
)
