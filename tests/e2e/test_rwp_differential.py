"""Differential test: the same seeded workload on the sim and on the real kernel, cycle by cycle.

Each cycle runs the agent's tracking sequence (RWPROTECT all, the workload's accesses in async
mode, SET_MODE(disable), the hot scan and the proof scan, SET_MODE(enable)) and records the hot
set and the present-but-not-accessed set. Between cycles the "VMM" punches one page (a hole) and
pwrites another (cached but unmapped), so every page state of mainline 7.3 occurs. The sim must
give the kernel's sets at every cycle. The kernel side needs UFFD_FEATURE_RWP (marked ``rwp``,
run by the kernel-VM tier) and skips elsewhere, after the sim side has run.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.rwp_targets import KernelTarget, SimTarget, Target, kernel_skip_reason
from tiermem.kernel import uapi
from tiermem.sim.workloads import parse_workload

N = 256
CYCLES = 6
ACC, PRESENT = uapi.PAGE_IS_ACCESSED, uapi.PAGE_IS_PRESENT
FEATURES = uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC | uapi.UFFD_FEATURE_MISSING_SHMEM

Trace = list[tuple[list[int], list[int]]]


def pages_of(regions: list[tuple[int, int, int]], bits: int) -> list[int]:
    return [p for a, b, c in regions if c & bits == bits for p in range(a, b)]


def run(t: Target, spec: str, seed: int) -> Trace:
    """(hot pages, provably cold pages) after each cycle of the workload."""
    batches = parse_workload(spec, N, seed).batches()
    for p in range(N):
        t.write(p, 1)  # every page resident and mapped, as after a guest's first touches
    t.register(0, N, uapi.UFFDIO_REGISTER_MODE_RWP)  # RWP only: no MISSING/MINOR handler needed
    out: Trace = []
    for c in range(CYCLES):
        t.rwprotect(0, N, True)
        pages, writes = next(batches)
        for p, w in zip(pages.tolist(), writes.tolist(), strict=True):
            if w:
                t.write(p, (c + 2) & 0xFF)
            else:
                t.read(p)
        t.set_mode(disable=uapi.UFFD_FEATURE_RWP_ASYNC)
        hot = pages_of(t.scan(category_mask=ACC, return_mask=ACC), ACC)
        regions = t.scan(category_mask=PRESENT, return_mask=PRESENT | ACC)
        proven = sorted(set(pages_of(regions, PRESENT)) - set(pages_of(regions, ACC)))
        t.set_mode(enable=uapi.UFFD_FEATURE_RWP_ASYNC)
        out.append((hot, proven))
        t.punch((c * 37) % N)  # a hole: the next touch allocates (no MISSING registered)
        t.pwrite((c * 53 + 11) % N, bytes([7]) * 4096)  # cached but unmapped until touched
    return out


@pytest.mark.parametrize("spec", ["hotset:0.1", "zipf:1.1", "phases:0.2:period=2"])
def test_sim_and_kernel_agree_on_every_cycle(spec: str) -> None:
    sim = run(SimTarget(FEATURES, N), spec, seed=7)
    assert all(hot for hot, _ in sim) and all(proven for _, proven in sim)
    assert any(set(range(N)) - set(hot) - set(proven) for hot, proven in sim)  # unmapped pages occur
    why = kernel_skip_reason()
    if why:
        pytest.skip(f"sim side ran; kernel side: {why}")
    k = KernelTarget(FEATURES, N)
    try:
        kernel = run(k, spec, seed=7)
    finally:
        k.teardown()
    for c, (s, r) in enumerate(zip(sim, kernel, strict=True)):
        assert s[0] == r[0], f"cycle {c}: hot sets differ"
        assert s[1] == r[1], f"cycle {c}: provably cold sets differ"
    assert np.array_equal(np.array([len(h) for h, _ in sim]), np.array([len(h) for h, _ in kernel]))


pytestmark = [pytest.mark.rwp]
