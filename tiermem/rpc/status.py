"""tiermem errors -> gRPC status codes, in one place, and back for clients."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from tiermem import errors

__all__ = ["LEADER_METADATA_KEY", "error_from_rpc", "grpc_errors", "grpc_stream_errors", "status_for"]

LEADER_METADATA_KEY = "tiermem-leader"
"""Trailing metadata of a NotLeader refusal: the leader's address, for clients that follow it."""

_MAP: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigurationError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.KernelError, grpc.StatusCode.INTERNAL),
]

_REVERSE: dict[grpc.StatusCode, type[errors.TiermemError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.StoreFull,
    grpc.StatusCode.DATA_LOSS: errors.IntegrityError,
    grpc.StatusCode.UNAUTHENTICATED: errors.InvalidArgument,
    grpc.StatusCode.PERMISSION_DENIED: errors.InvalidArgument,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for a tiermem error (INTERNAL for anything else)."""
    for typ, code in _MAP:
        if isinstance(exc, typ):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_rpc(exc: grpc.RpcError) -> errors.TiermemError:
    """A client-side tiermem error for a failed call, keeping the server's message."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _REVERSE.get(code, errors.TiermemError)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"server unavailable: {details}"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        details = f"unauthenticated: {details}"
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        details = f"permission denied: {details}"
    err = cls(details or code.name)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        leader = _trailing(exc).get(LEADER_METADATA_KEY)
        if leader is not None:
            err = errors.NotLeader(details or code.name, leader)
    err.code = code  # type: ignore[attr-defined]
    return err


def _trailing(exc: grpc.RpcError) -> dict[str, str]:
    get = getattr(exc, "trailing_metadata", None)
    try:
        md = get() if callable(get) else None
    except Exception:  # a call that never reached the server has none
        return {}
    return {str(k): str(v) for k, v in (md or ())}


def _abort_args(e: errors.TiermemError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    md = ((LEADER_METADATA_KEY, e.leader_address),) if isinstance(e, errors.NotLeader) else ()
    return status_for(e), str(e) or type(e).__name__, md


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def grpc_errors(fn: F) -> F:
    """Decorate an aio servicer method: tiermem errors abort with their status code."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await fn(self, request, context)
        except errors.TiermemError as e:
            await context.abort(*_abort_args(e))

    return wrapper  # type: ignore[return-value]


def grpc_stream_errors(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Like :func:`grpc_errors` for server-streaming methods."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except errors.TiermemError as e:
            await context.abort(*_abort_args(e))

    return wrapper
