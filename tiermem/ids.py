"""The one grammar of ids (VMs, nodes, tenants), checked with ``fullmatch``.

Every layer validates ids through this module, so the agent, the control plane,
the handoff socket, the token interceptor and the CLI accept exactly the same
strings. ``fullmatch`` matters: ``re.match`` with ``$`` accepts a trailing
newline, which made ``acme.vm1\\n`` a second, distinct VM.
"""

from __future__ import annotations

import re

from tiermem.errors import InvalidArgument

__all__ = ["ID_MAX", "TENANT_MAX", "is_id", "is_tenant", "validate_id", "validate_tenant"]

ID_MAX = 64
"""Longest VM or node id."""
TENANT_MAX = 32
"""Longest tenant name (the part of a VM id before its first dot)."""

# ASCII only: str.isalnum() and \w would let in Unicode look-alikes and digits of other scripts.
_ID_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{ID_MAX - 1}}}", re.ASCII)
_TENANT_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{TENANT_MAX - 1}}}", re.ASCII)


def is_id(value: object) -> bool:
    """True if ``value`` is a valid VM or node id."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def is_tenant(value: object) -> bool:
    """True if ``value`` is a valid tenant name."""
    return isinstance(value, str) and _TENANT_RE.fullmatch(value) is not None


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid VM/node id, else raise InvalidArgument."""
    if not is_id(value):
        raise InvalidArgument(
            f"invalid {what} {_shown(value)}: use 1-{ID_MAX} characters of [A-Za-z0-9._-], starting alphanumeric"
        )
    assert isinstance(value, str)
    return value


def validate_tenant(value: object, what: str = "tenant") -> str:
    """Return ``value`` if it is a valid tenant name, else raise InvalidArgument."""
    if not is_tenant(value):
        raise InvalidArgument(
            f"invalid {what} {_shown(value)}: use 1-{TENANT_MAX} characters of [A-Za-z0-9_-], starting alphanumeric"
        )
    assert isinstance(value, str)
    return value


def _shown(value: object) -> str:
    """The rejected value for an error message: repr (control characters escaped), cut short."""
    text = repr(value)
    return text if len(text) <= ID_MAX + 8 else text[: ID_MAX + 4] + "...'"
