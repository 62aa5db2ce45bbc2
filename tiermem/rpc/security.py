"""Authentication for every gRPC server and client: TLS/mTLS credentials and bearer tokens.

One server interceptor enforces the token; TLS is enforced by the transport.
Unauthenticated calls get UNAUTHENTICATED; a token for another tenant gets
PERMISSION_DENIED. The health service stays open so probes work without a token.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from tiermem.config import TlsSettings
from tiermem.errors import ConfigurationError

__all__ = ["TokenAuthInterceptor", "channel_credentials", "server_credentials"]

OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} {path!r}: {e.strerror}") from None


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """Server credentials for ``tls``, or None for plaintext."""
    if not tls.cert_file:
        return None
    if not tls.key_file:
        raise ConfigurationError("tls.key_file is required with tls.cert_file")
    ca = _read(tls.ca_file, "tls.ca_file") if tls.ca_file else None
    if tls.require_client_cert and ca is None:
        raise ConfigurationError("tls.require_client_cert needs tls.ca_file to verify clients")
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "tls.key_file"), _read(tls.cert_file, "tls.cert_file"))],
        root_certificates=ca,
        require_client_auth=tls.require_client_cert,
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials | None:
    """Client credentials for ``tls``, or None for plaintext."""
    if not tls.enabled:
        return None
    ca = _read(tls.ca_file, "tls.ca_file") if tls.ca_file else None
    key = _read(tls.key_file, "tls.key_file") if tls.key_file else None
    cert = _read(tls.cert_file, "tls.cert_file") if tls.cert_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on every call but health checks.

    ``tokens`` maps a token to the tenant it may act for; ``*`` is every tenant.
    Tenant checks on VM ids are done by servicers through ``tenant_of``.
    """

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = dict(tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS):
            return await continuation(handler_call_details)
        md = dict(handler_call_details.invocation_metadata or ())
        header = md.get("authorization", "")
        token = header[7:] if isinstance(header, str) and header.lower().startswith("bearer ") else ""
        tenant = self._match(token)
        if tenant is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        want = md.get("x-tiermem-tenant", "")
        if want and tenant != "*" and want != tenant:
            return _deny(grpc.StatusCode.PERMISSION_DENIED, f"token is not valid for tenant {want!r}")
        return await continuation(handler_call_details)

    def _match(self, token: str) -> str | None:
        if not token:
            return None
        for known, tenant in self._tokens.items():
            # constant-time comparison: no timing oracle on tokens
            if hmac.compare_digest(known.encode(), token.encode()):
                return tenant
        return None


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield None  # pragma: no cover - makes this an async generator

    # A denied call may be unary or server-streaming; a unary-unary handler aborts either way
    # before any response is read.
    del stream
    return grpc.unary_unary_rpc_method_handler(unary)
