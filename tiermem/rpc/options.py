"""Channel and server options shared by every tiermem client and server.

Keepalive: clients ping every ``CLIENT_KEEPALIVE_MS`` so that a long idle stream (``events
--follow``) survives NATs and load balancers; servers must accept pings that often, or they answer
with GOAWAY ``too_many_pings`` (gRPC's server default allows one ping per 5 minutes). The server's
minimum interval is therefore below the clients' ping interval.

Retries: idempotent reads are retried on UNAVAILABLE through the gRPC service config, so a
restarting control plane or agent does not fail a ``vm list``.
"""

from __future__ import annotations

import json

__all__ = [
    "CLIENT_KEEPALIVE_MS",
    "SERVER_MIN_PING_INTERVAL_MS",
    "client_options",
    "server_options",
]

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CLIENT_KEEPALIVE_MS = 30_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_MIN_PING_INTERVAL_MS = 10_000
"""Below CLIENT_KEEPALIVE_MS with margin for timer skew."""
SERVER_KEEPALIVE_MS = 60_000
"""The server pings idle clients too, to drop half-open connections."""

# Read-only methods: safe to retry.
_IDEMPOTENT = {
    "tiermem.v1.ControlPlane": [
        "ListNodes",
        "GetVmStatus",
        "ListVmStatus",
        "GetPolicy",
        "ListPolicies",
        "ListCycleReports",
    ],
    "tiermem.v1.NodeAgent": ["GetStats", "ListVms", "VerifyVm"],
    "grpc.health.v1.Health": ["Check"],
}

SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": svc, "method": m} for svc, methods in _IDEMPOTENT.items() for m in methods
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def client_options(
    keepalive_ms: int = CLIENT_KEEPALIVE_MS, keepalive_timeout_ms: int = CLIENT_KEEPALIVE_TIMEOUT_MS
) -> list[tuple[str, object]]:
    """Options of every client channel."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(min_ping_interval_ms: int = SERVER_MIN_PING_INTERVAL_MS) -> list[tuple[str, object]]:
    """Options of every server: keepalive enforcement that accepts the clients' pings."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.http2.max_pings_without_data", 0),
    ]
