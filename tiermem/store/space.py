"""Store namespaces: which node, VM and incarnation a stored page belongs to.

Every store key or prefix is built from a *space* string, ``<node>~<vm>~<incarnation>``
(``~`` is outside the id grammar, so the three parts can never be confused, and
no space is a prefix of another). Two agents that share one Redis or one S3
bucket, or two incarnations of one VM id, therefore never write, read or purge
each other's pages; the page MAC (:mod:`tiermem.store.pagemac`) covers the space
too. A bare VM id is still a valid space, for tools and tests that use a store
directly.
"""

from __future__ import annotations

import functools
import re

from tiermem.errors import InvalidArgument
from tiermem.model import validate_id

__all__ = ["SEP", "split_space", "store_space", "validate_incarnation", "validate_space"]

SEP = "~"
_INCARNATION_RE = re.compile(r"[0-9a-f]{16}")


def validate_incarnation(value: str) -> str:
    """An incarnation is 16 lowercase hex digits (64 random bits, issued at first attach)."""
    if not isinstance(value, str) or not _INCARNATION_RE.fullmatch(value):
        raise InvalidArgument(f"invalid incarnation {value!r}: use 16 lowercase hex digits")
    return value


def store_space(node_id: str, vm_id: str, incarnation: str) -> str:
    """The namespace of one incarnation of one VM on one node."""
    validate_id(node_id, "node id")
    validate_id(vm_id, "VM id")
    validate_incarnation(incarnation)
    return f"{node_id}{SEP}{vm_id}{SEP}{incarnation}"


def split_space(space: str) -> tuple[str, str, str]:
    """``(node, vm, incarnation)`` of a space; a bare VM id gives ``("", vm, "")``."""
    parts = space.split(SEP) if isinstance(space, str) else []
    if len(parts) == 1:
        return "", validate_id(parts[0], "VM id"), ""
    if len(parts) == 3:
        return (
            validate_id(parts[0], "node id"),
            validate_id(parts[1], "VM id"),
            validate_incarnation(parts[2]),
        )
    raise InvalidArgument(f"invalid store namespace {space!r}: use <node>~<vm>~<incarnation> or a VM id")


@functools.lru_cache(maxsize=4096)  # on every store call; errors are not cached
def validate_space(space: str) -> str:
    """Return ``space`` if it is a valid namespace (see :func:`split_space`), else raise InvalidArgument."""
    split_space(space)
    return space
