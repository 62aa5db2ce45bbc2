"""A simulated VM for the agent: an armed :class:`SimKernel` and, with a workload, its in-process guest.

Registered as the ``sim`` backend in :mod:`tiermem.kernel.registry`.
"""

from __future__ import annotations

from tiermem.kernel import uapi
from tiermem.kernel.backend import TRACKED_REGISTER_MODE
from tiermem.sim.kernel import SimKernel
from tiermem.sim.trace import DEFAULT_MAX_BYTES, TraceDir
from tiermem.sim.workloads import SimGuest, parse_workload

__all__ = ["create_sim_vm"]


def create_sim_vm(
    n_pages: int,
    *,
    synthetic: bool = False,
    workload: str = "",
    vcpus: int = 1,
    seed: int = 0,
    trace_dir: str = "",
    trace_max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[SimKernel, SimGuest | None]:
    """A registered sim kernel of ``n_pages`` and its guest (not started) when ``workload`` is set.

    The workload spec is checked before the guest memory is allocated
    (InvalidArgument); MemoryError when the memory cannot be allocated. A
    ``trace:`` workload is read only from ``trace_dir`` (empty: refused), at most
    ``trace_max_bytes``: this runs inside the agent, on requests from the network.
    """
    traces = TraceDir(trace_dir or None, trace_max_bytes)
    wl = parse_workload(workload, n_pages, seed, traces) if workload else None
    sim = SimKernel(n_pages, synthetic=synthetic)
    sim.api(uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC | uapi.UFFD_FEATURE_THREAD_ID)
    sim.register(sim.base, sim.size, TRACKED_REGISTER_MODE)
    guest = SimGuest(sim, wl, vcpus=vcpus, seed=seed) if wl is not None else None
    return sim, guest
