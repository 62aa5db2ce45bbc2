"""Open the control plane's state store named by a URL (``sqlite:///path`` or ``redis://host:port/db``).

Apart from :mod:`tiermem.control.state` so that the interface does not import
its implementations (each implementation imports the interface).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tiermem.control.clock import Clock
from tiermem.control.state import DEFAULT_EVENTS_KEEP, DEFAULT_REPORTS_KEEP, StateStore
from tiermem.control.state_redis import RedisState
from tiermem.control.state_sqlite import SqliteState
from tiermem.errors import ConfigurationError

__all__ = ["open_state"]


def open_state(
    url: str,
    clock: Clock | None = None,
    reports_keep: int = DEFAULT_REPORTS_KEEP,
    events_keep: int = DEFAULT_EVENTS_KEEP,
) -> StateStore:
    """The state store for ``url`` (not yet opened); ConfigurationError for an unknown scheme."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SqliteState(url, clock=clock, reports_keep=reports_keep, events_keep=events_keep)
    if scheme in ("redis", "rediss", "unix"):
        return RedisState(url, clock=clock, reports_keep=reports_keep, events_keep=events_keep)
    raise ConfigurationError(f"unknown state store {url!r}: use sqlite:///path or redis://host:port/db")
