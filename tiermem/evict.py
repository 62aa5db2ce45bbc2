"""Eviction algorithms: the one decision step every engine runs at a cycle close.

The agent's :class:`~tiermem.agent.cycle.CycleEngine`, both engines of ``tiermem
simulate`` and ``tiermem bench policy`` all call :meth:`Algorithm.close`, so a
policy is measured exactly as it runs. At a close an algorithm sees only the past
(:class:`CloseView`): which resident pages were accessed in the cycle, which
pages were promoted since the last close, the pages the frozen scan proves cold
(present, still protected, untouched: the only ones it may evict) and the cap.
It returns the pages to evict (sorted) from those candidates, within the cap.

Algorithms (``NAMES``; ``recommended`` is an alias of the best measured one):

``age``
    Today's model: a page's age is the cycles since its last access (uint8,
    saturating); candidates with age >= ``cold_after`` are cold. 1 byte per page.
``rrd`` (re-reference distance)
    ``age`` plus one byte per page estimating the page's *re-reference gap*:
    the idle cycles it shows between accesses (the mean of the previous
    estimate and the latest gap; ages keep counting while a page is evicted,
    so a promotion teaches the gap it ended). A page whose estimate is short
    (< ``long`` = ``cold_after``) is evicted only after ``hold`` idle cycles
    (``cold_after + 1``); a page with no estimate yet, or a long one, after
    ``fast`` (1 at ``cold_after`` 2), earlier than ``age``. Why: most of the
    memory saved comes from pages that are never touched again or idle for
    long, and evicting those one cycle earlier saves more; the promotions come
    from pages that return after short gaps, which ``hold`` keeps resident
    once they have shown it. State 2 bytes per page (age, gap estimate); CPU a
    few whole-array numpy passes per close (measured by ``tiermem bench
    policy``). The SLO controller's back-off doubles ``cold_after``, which
    scales ``fast``, ``hold`` and ``long``.

Caps: when more pages are cold than the cap allows, the oldest go first, then the
lowest page number (reproducible). ``commit=False`` (a dry run) leaves the state
untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tiermem.errors import InvalidArgument

__all__ = ["ALIASES", "NAMES", "Algorithm", "CloseView", "create", "parse_options", "resolve"]

_MAX = 255  # ages and gaps are uint8 and saturate


@dataclass(frozen=True)
class CloseView:
    """What an algorithm sees at a cycle close (arrays have one entry per guest page)."""

    hot: np.ndarray
    """bool: resident pages accessed during the cycle (promoted pages included)."""
    candidates: np.ndarray
    """bool: resident pages the frozen scan proves cold; the only pages that may be evicted."""
    promoted: np.ndarray
    """int64: pages promoted (faulted back from the store) since the last close."""
    limit: int | None
    """Most pages to evict at this close (caps and min_resident); None: no limit."""


class Algorithm(ABC):
    """One VM's eviction algorithm and its per-page state."""

    name: ClassVar[str]
    state_bytes_per_page: ClassVar[int]
    defaults: ClassVar[dict[str, int]] = {}
    """Options (``--policy-opt key=value``) and their defaults; all integers."""

    def __init__(self, n_pages: int, cold_after: int, options: dict[str, int]) -> None:
        self.n_pages = n_pages
        self.cold_after = cold_after
        self.opts = {**self.defaults, **options}

    @abstractmethod
    def close(self, view: CloseView, *, commit: bool = True) -> tuple[np.ndarray, int]:
        """Pages to evict (sorted int64) and the number that were cold before the limit."""


def _choose(cold: np.ndarray, age: np.ndarray, limit: int | None) -> tuple[np.ndarray, int]:
    """``cold`` (sorted pages) within ``limit``: oldest first, then lowest page first."""
    n_cold = int(cold.size)
    if limit is not None and n_cold > limit:
        order = np.lexsort((cold, -age[cold].astype(np.int16)))
        cold = np.sort(cold[order[: max(limit, 0)]])
    return cold, n_cold


class AgePolicy(Algorithm):
    """Evict after ``cold_after`` cycles without an access."""

    name = "age"
    state_bytes_per_page = 1

    def __init__(self, n_pages: int, cold_after: int, options: dict[str, int]) -> None:
        super().__init__(n_pages, cold_after, options)
        self.ages = np.zeros(n_pages, dtype=np.uint8)

    def close(self, view: CloseView, *, commit: bool = True) -> tuple[np.ndarray, int]:
        ages = self.ages if commit else self.ages.copy()
        ages[view.hot] = 0
        np.add(ages, view.candidates.astype(np.uint8), out=ages, where=ages < _MAX)
        cold = np.flatnonzero(view.candidates & (ages >= self.cold_after))
        return _choose(cold, ages, view.limit)


class RrdPolicy(Algorithm):
    """Per-page threshold from the page's last re-reference gap (see the module docstring)."""

    name = "rrd"
    state_bytes_per_page = 2
    defaults: ClassVar[dict[str, int]] = {"fast": 1, "hold": 0, "long": 0, "avg": 1}
    """``fast``: idle cycles before a page without short-gap history is evicted (x cold_after/2);
    ``hold``: before a short-gap page is (0: cold_after + 1); ``long``: gaps this long or longer
    are long (0: cold_after); ``avg``: 1 = the gap estimate is the mean of the last estimate and
    the new gap, 0 = the last gap. Tuned on xz, sqlite3, awk and python3 traces (docs/benchmarks.md)."""

    def __init__(self, n_pages: int, cold_after: int, options: dict[str, int]) -> None:
        super().__init__(n_pages, cold_after, options)
        self.ages = np.zeros(n_pages, dtype=np.uint8)  # idle cycles, evicted ones included
        self.gaps = np.full(n_pages, _MAX, dtype=np.uint8)  # last re-reference gap; unknown = long

    def close(self, view: CloseView, *, commit: bool = True) -> tuple[np.ndarray, int]:
        ages = self.ages if commit else self.ages.copy()
        gaps = self.gaps if commit else self.gaps.copy()
        a = self.cold_after
        fast = min(self.opts["fast"] * max(a // 2, 1), _MAX)  # the SLO's back-off scales both
        hold = min(self.opts["hold"] or a + 1, _MAX)
        long = min(self.opts["long"] or a, _MAX)
        # A page back after idle cycles shows its gap: a re-reference before eviction, or a promotion
        # (installed without the RWP marker, so the scan reports it accessed). ``view.promoted`` is
        # not used: on the agent it can reach the close after the one that saw the page hot.
        back = view.hot & (ages > 0)
        if self.opts["avg"]:  # a mean over gaps: one odd gap does not flip the page's class
            known = back & (gaps < _MAX)
            gaps[known] = ((gaps[known].astype(np.uint16) + ages[known]) // 2).astype(np.uint8)
            first = back & ~known
            gaps[first] = ages[first]
        else:
            gaps[back] = ages[back]
        ages[view.hot] = 0
        np.add(ages, 1, out=ages, where=~view.hot & (ages < _MAX))
        thr = np.where(gaps < long, hold, fast).astype(np.uint8)
        cold = np.flatnonzero(view.candidates & (ages >= thr))
        return _choose(cold, ages, view.limit)


_ALGORITHMS: dict[str, type[Algorithm]] = {c.name: c for c in (AgePolicy, RrdPolicy)}
ALIASES = {"recommended": "rrd"}
NAMES = (*_ALGORITHMS, *ALIASES)


def resolve(name: str) -> type[Algorithm]:
    """The class of algorithm ``name`` (an alias resolves to its target); InvalidArgument if unknown."""
    cls = _ALGORITHMS.get(ALIASES.get(name, name))
    if cls is None:
        raise InvalidArgument(f"unknown eviction policy {name!r}; known: {', '.join(NAMES)}")
    return cls


def parse_options(name: str, text: str | list[str] | tuple[str, ...]) -> dict[str, int]:
    """``"fast=1,hold=4"`` (or a list of ``key=value``) checked against ``name``'s options."""
    cls = resolve(name)
    items = [t for part in ([text] if isinstance(text, str) else text) for t in part.split(",") if t.strip()]
    out: dict[str, int] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in cls.defaults:
            known = ", ".join(sorted(cls.defaults)) or "none"
            raise InvalidArgument(f"policy {name!r}: bad option {item.strip()!r} (options: {known})")
        try:
            v = int(value)
        except ValueError:
            raise InvalidArgument(f"policy {name!r}: option {key} must be an integer") from None
        if not 0 <= v <= _MAX:
            raise InvalidArgument(f"policy {name!r}: option {key} must be between 0 and {_MAX}")
        out[key] = v
    return out


def create(name: str, n_pages: int, cold_after: int, options: str = "") -> Algorithm:
    """A fresh algorithm ``name`` for a guest of ``n_pages``."""
    cls = resolve(name)
    return cls(n_pages, cold_after, parse_options(name, options))
