"""Client channels with TLS, bearer tokens and default deadlines."""

from __future__ import annotations

import grpc

from tiermem.config import TlsSettings
from tiermem.rpc.security import channel_credentials

__all__ = ["aio_channel", "auth_metadata", "sync_channel"]

_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
]


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _opts(tls: TlsSettings) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = list(_OPTIONS)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return opts


def aio_channel(address: str, tls: TlsSettings | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``address``."""
    tls = tls or TlsSettings()
    creds = channel_credentials(tls)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=_opts(tls))
    return grpc.aio.secure_channel(address, creds, options=_opts(tls))


def sync_channel(address: str, tls: TlsSettings | None = None) -> grpc.Channel:
    """A blocking channel to ``address`` (the CLI)."""
    tls = tls or TlsSettings()
    creds = channel_credentials(tls)
    if creds is None:
        return grpc.insecure_channel(address, options=_opts(tls))
    return grpc.secure_channel(address, creds, options=_opts(tls))
