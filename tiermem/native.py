"""The optional native extension ``tiermem._native``: whether it is built, and its typed entry points.

The extension is built by pip from ``csrc/`` with the system compiler (``setup.py``;
``make setup`` installs the compiler and the zstd/lz4/sodium/hiredis headers from the OS).
It is optional: without it every caller uses its pure-Python path, and
``tiermem doctor`` says so. ``TIERMEM_NATIVE=0`` turns it off (A/B runs, the
reference path in tests).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["available", "match_regions", "mod", "paths", "reason", "regions", "run_bounds"]


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("TIERMEM_NATIVE", "1") in ("0", "off", "false", "no"):
        return None, "turned off by TIERMEM_NATIVE=0"
    try:
        from tiermem import _native  # type: ignore[attr-defined]
    except ImportError as e:
        return (
            None,
            f"not built ({e}); run `make setup` (needs a C compiler and libzstd/liblz4/libsodium headers)",
        )
    return _native, "built"


mod, reason = _load()


def available() -> bool:
    """True when the native extension is loaded."""
    return mod is not None


def paths() -> dict[str, str]:
    """Which implementation each native-capable path uses in this process (``tiermem doctor``)."""
    return {
        "extension": "built" if mod is not None else f"unavailable: {reason}",
        "sim_scan": "native" if mod is not None else "numpy",
        "fault_serve": "native" if mod is not None and hasattr(mod, "FaultPath") else "python",
        # Redis pages on the fault thread need hiredis at build time (rediss:// always stays in Python)
        "fault_serve_redis": "native" if mod is not None and getattr(mod, "HAVE_REDIS", False) else "python",
    }


def run_bounds(states: np.ndarray, mask: int = 0xFF, val: int = -1) -> np.ndarray:
    """``[0, i..., len(states)]`` for every ``i >= 1`` where the class of ``states[i]`` differs from
    ``states[i-1]``'s: the bounds of the runs of one class. The class of a uint8 state is
    ``state & mask``, or ``(state & mask) == val`` when ``val >= 0``. Native only."""
    assert mod is not None
    n = len(states)
    out = np.empty(n + 66, dtype=np.int64)
    k = mod.edges(np.ascontiguousarray(states, dtype=np.uint8), out[1:], mask, val)
    out[0] = 0
    out[k + 1] = n
    return out[: k + 2]


def regions(
    starts: np.ndarray, ends: np.ndarray, keys: np.ndarray, base: int, page_size: int, dtype: Any
) -> np.ndarray:
    """Page runs as an array of ``dtype`` (three u64 fields: start, end, categories); native only."""
    assert mod is not None
    out = np.empty(len(starts), dtype=dtype)
    mod.regions(
        starts.astype(np.int64, copy=False),
        ends.astype(np.int64, copy=False),
        keys.astype(np.int64, copy=False),
        base,
        page_size,
        out,
    )
    return out


def match_regions(
    states: np.ndarray, mask: int, val: int, match: int, key: int, base: int, page_size: int, dtype: Any
) -> np.ndarray:
    """The runs of states of class ``match`` (classes as in :func:`run_bounds`) as an array of ``dtype``
    regions (start and end addresses, ``key`` as categories), in one pass over the states after a
    counting pass. Native only."""
    assert mod is not None
    src = np.ascontiguousarray(states, dtype=np.uint8)
    edges = mod.count_edges(src, mask, val)
    out = np.empty(edges // 2 + 1, dtype=dtype)  # a run takes two edges, or one at either end
    n = mod.match_regions(src, mask, val, match, key, base, page_size, out)
    return out[:n]
