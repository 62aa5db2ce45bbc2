"""tiermem errors -> gRPC status codes, in one place, and back for clients."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from tiermem import errors

__all__ = ["error_from_rpc", "grpc_errors", "grpc_stream_errors", "status_for"]

_MAP: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ConfigurationError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
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
    err.code = code  # type: ignore[attr-defined]
    return err


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def grpc_errors(fn: F) -> F:
    """Decorate an aio servicer method: tiermem errors abort with their status code."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await fn(self, request, context)
        except errors.TiermemError as e:
            await context.abort(status_for(e), str(e) or type(e).__name__)

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
            await context.abort(status_for(e), str(e) or type(e).__name__)

    return wrapper
