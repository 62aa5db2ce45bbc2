"""Client channels with TLS, bearer tokens and default deadlines."""

from __future__ import annotations

import grpc

from tiermem.config import TlsSettings
from tiermem.rpc.options import CLIENT_KEEPALIVE_MS, client_options
from tiermem.rpc.security import channel_credentials

__all__ = ["aio_channel", "auth_metadata", "sync_channel"]


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _opts(tls: TlsSettings, keepalive_ms: int = CLIENT_KEEPALIVE_MS) -> list[tuple[str, object]]:
    opts = client_options(keepalive_ms)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return opts


def aio_channel(
    address: str, tls: TlsSettings | None = None, keepalive_ms: int = CLIENT_KEEPALIVE_MS
) -> grpc.aio.Channel:
    """An asyncio channel to ``address``."""
    tls = tls or TlsSettings()
    creds = channel_credentials(tls)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=_opts(tls, keepalive_ms))
    return grpc.aio.secure_channel(address, creds, options=_opts(tls, keepalive_ms))


def sync_channel(
    address: str, tls: TlsSettings | None = None, keepalive_ms: int = CLIENT_KEEPALIVE_MS
) -> grpc.Channel:
    """A blocking channel to ``address`` (the CLI)."""
    tls = tls or TlsSettings()
    creds = channel_credentials(tls)
    if creds is None:
        return grpc.insecure_channel(address, options=_opts(tls, keepalive_ms))
    return grpc.secure_channel(address, creds, options=_opts(tls, keepalive_ms))
