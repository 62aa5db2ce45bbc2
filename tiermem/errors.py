"""The one tiermem exception tree.

Backend errors (redis-py, botocore, OSError from ioctls) are translated into this
tree at each boundary, and this tree is translated into gRPC status codes in one
place (``tiermem.rpc.status``)::

    TiermemError
    ├── InvalidArgument        bad input: ids, alignment, ranges, sizes, policies  -> INVALID_ARGUMENT
    ├── NotFound               unknown VM, node, policy or page                     -> NOT_FOUND
    ├── AlreadyExists          duplicate VM or node                                 -> ALREADY_EXISTS
    ├── FailedPrecondition     the request is valid but the state forbids it        -> FAILED_PRECONDITION
    ├── ConfigurationError     bad settings, store URL or credentials               -> INVALID_ARGUMENT
    ├── Unavailable            a dependency cannot be reached right now             -> UNAVAILABLE
    │   └── StoreUnavailable   the page store timed out, refused or failed
    ├── StoreFull              the store is full or over quota                      -> RESOURCE_EXHAUSTED
    ├── IntegrityError         a payload failed its checksum or length check        -> DATA_LOSS
    └── KernelError            a uffd/ioctl operation failed (carries errno)        -> INTERNAL
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "ConfigurationError",
    "FailedPrecondition",
    "IntegrityError",
    "InvalidArgument",
    "KernelError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StoreFull",
    "StoreUnavailable",
    "TiermemError",
    "Unavailable",
]


class TiermemError(Exception):
    """Base of every error tiermem raises on purpose."""


class InvalidArgument(TiermemError):
    """The caller passed a value that can never be valid."""


class NotFound(TiermemError):
    """The named VM, node, policy or page does not exist."""


class AlreadyExists(TiermemError):
    """The object being created already exists."""


class FailedPrecondition(TiermemError):
    """The request is well-formed but the current state does not allow it."""


class PermissionDenied(TiermemError):
    """The caller's role may not do this (a tenant asking for an operator-only facility)."""


class ResourceExhausted(TiermemError):
    """A per-caller limit is reached (e.g. a tenant's concurrent manual cycles); retry later."""


class NotLeader(FailedPrecondition):
    """A write reached a control-plane replica that does not lead; ``leader_address`` names the one that
    does (empty while no replica leads). The replica refused before changing anything: retrying there is safe."""

    def __init__(self, message: str, leader_address: str = "") -> None:
        super().__init__(message)
        self.leader_address = leader_address


class ConfigurationError(TiermemError):
    """Settings, a store URL or credentials are wrong."""


class Unavailable(TiermemError):
    """A dependency cannot be reached now; the operation may be retried."""


class StoreUnavailable(Unavailable):
    """The page store could not complete the operation (timeout, refused, 5xx)."""


class StoreFull(TiermemError):
    """The page store refused a write for lack of space or quota."""


class IntegrityError(TiermemError):
    """A payload failed verification; it is never returned as data."""


class KernelError(TiermemError):
    """A kernel operation failed; ``errno`` says why."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno
