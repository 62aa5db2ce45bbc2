"""What the page MAC costs: the keyed tag per evicted page and its verification per fault.

Measured in the same run as the fault and evict benchmarks, on the same number
of random 4 KiB pages, against the check it replaced (xxh3-64 of the page) as the
baseline. The tag is computed once per evicted page (``store.put_pages``) and
verified once per page installed by a fault (``store.get_pages``); see
:mod:`tiermem.store.pagemac` for the construction.
"""

from __future__ import annotations

import os
import time
from typing import Any

import xxhash

from tiermem.bench.common import ratio
from tiermem.model import PAGE_SIZE
from tiermem.store.pagemac import PageKeyring
from tiermem.store.space import store_space

__all__ = ["mac_cost"]


def mac_cost(pages: int = 4096, rounds: int = 5) -> dict[str, Any]:
    """µs per page: tag (evict), verify (fault) and the xxh3 baseline; best of ``rounds`` (least noise)."""
    keys = PageKeyring.ephemeral()
    space = store_space("bench", "vm", "0123456789abcdef")
    data = [os.urandom(PAGE_SIZE) for _ in range(max(1, pages))]
    n = len(data)
    best = {"tag": float("inf"), "verify": float("inf"), "xxh3": float("inf")}
    for _ in range(rounds):  # interleaved: drift on the shared cores hits all three
        t0 = time.perf_counter()
        tags = [keys.mac(space, i, 1, d) for i, d in enumerate(data)]
        t1 = time.perf_counter()
        ok = all(keys.verify(space, i, 1, d, t) for i, (d, t) in enumerate(zip(data, tags, strict=True)))
        t2 = time.perf_counter()
        for d in data:
            xxhash.xxh3_64_intdigest(d)
        t3 = time.perf_counter()
        assert ok
        best = {
            "tag": min(best["tag"], t1 - t0),
            "verify": min(best["verify"], t2 - t1),
            "xxh3": min(best["xxh3"], t3 - t2),
        }
    us = {k: round(v / n * 1e6, 2) for k, v in best.items()}
    return {
        "pages": n,
        "tag_us_per_page": us["tag"],
        "verify_us_per_page": us["verify"],
        "xxh3_us_per_page": us["xxh3"],
        "tag_vs_xxh3": ratio(us["tag"], us["xxh3"]),
        "construction": "keyed BLAKE2b-128 truncated to 64 bits (tiermem.store.pagemac)",
    }
