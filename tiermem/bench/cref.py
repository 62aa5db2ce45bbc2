"""The reference C fault handler of ``tiermem bench fault``, and CPU placement for a fair ratio.

:func:`c_handler_touch` builds ``csrc/ref_handler.c`` with the system compiler (``$CC``,
default ``cc``), takes a process guest's handoff itself (the same guest kind as the
agent's: a memfd mapping registered MISSING|MINOR by the guest, uffd passed over the
handoff socket), gives the uffd to the C handler and has the guest read its pages in the
given order: every read is a MISSING fault served by ``pread`` + ``UFFDIO_COPY`` from a
plain file. The guest's own timing of each faulting load is the baseline.

:func:`placement` pins this process (every thread, and so every thread and child created
while it is active) to one CPU, or leaves placement to the scheduler. On this nested
virtualisation host, waking a thread on the other CPU costs ~75 µs, which makes unpinned
figures bimodal: the ratio compares runs with the same placement.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tiermem.bench.common import GuestDriver, pages_spec
from tiermem.errors import FailedPrecondition
from tiermem.handoff.listener import HandoffAttach, HandoffListener
from tiermem.model import PAGE_SIZE

__all__ = ["build_ref_handler", "c_handler_touch", "placement"]


def build_ref_handler(out_dir: Path) -> Path:
    """Compile the reference handler into ``out_dir``; FailedPrecondition without a compiler."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise FailedPrecondition(
            f"the C reference handler needs a C compiler ({cc!r} not found): install gcc"
        )
    exe = out_dir / "ref_handler"
    with resources.as_file(resources.files("tiermem.bench") / "csrc" / "ref_handler.c") as src:
        proc = subprocess.run([cc, "-O2", "-o", str(exe), str(src)], capture_output=True, text=True)
    if proc.returncode:
        raise FailedPrecondition(f"building the C reference handler failed: {proc.stderr.strip()[-500:]}")
    return exe


def _tasks() -> list[int]:
    return [int(t) for t in os.listdir("/proc/self/task")]


@contextlib.contextmanager
def placement(cpu: int | None) -> Iterator[None]:
    """Pin every thread of this process to ``cpu`` for the duration (None: leave placement alone)."""
    if cpu is None:
        yield
        return
    saved: dict[int, set[int]] = {}
    for tid in _tasks():
        with contextlib.suppress(OSError):  # a thread may end meanwhile
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {cpu})
    try:
        yield
    finally:
        for tid, cpus in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def c_handler_touch(
    order: Sequence[int] | np.ndarray, n_pages: int, *, tmp: Path | None = None
) -> dict[str, Any]:
    """The guest's read of ``order`` (page numbers of a guest of ``n_pages``), every read a MISSING
    fault served by the C reference handler: the guest's ``touch`` answer (p50_us, p99_us, max_us)."""
    with contextlib.ExitStack() as stack:
        root = tmp or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiermem-bench-cref-")))
        exe = build_ref_handler(root)
        data = root / "pages"
        with open(data, "wb") as f:  # the pages it serves: a plain file, warm in the page cache
            for _ in range(n_pages):
                f.write(os.urandom(PAGE_SIZE))
        procs: list[subprocess.Popen[bytes]] = []

        def on_attach(a: HandoffAttach) -> None:
            if len(a.regions) != 1:
                raise FailedPrecondition(f"the reference handler serves one region, got {len(a.regions)}")
            r = a.regions[0]
            uffd, memfd = a.take_fds()
            try:
                procs.append(
                    subprocess.Popen(
                        [
                            str(exe),
                            str(uffd),
                            hex(r.base_host_virt_addr),
                            str(r.page_size),
                            str(r.size // r.page_size),
                            str(data),
                            str(a.peer_pid),
                        ],
                        pass_fds=(uffd,),
                        stderr=subprocess.PIPE,
                    )
                )
            finally:
                os.close(uffd)
                if memfd is not None:
                    os.close(memfd)

        listener = HandoffListener(str(root / "handoff.sock"), on_attach).start()
        stack.callback(listener.stop)
        guest = GuestDriver(str(root / "handoff.sock"), "cref", f"{n_pages * PAGE_SIZE // 1024}K")
        try:
            touched = guest.cmd(f"touch {pages_spec(order)} r", timeout=600)
        finally:
            guest.close()
            for p in procs:
                try:
                    _, err = p.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    _, err = p.communicate()
                if p.returncode:
                    raise FailedPrecondition(
                        f"the C reference handler failed: {err.decode(errors='replace')[-300:]}"
                    )
        served = int(err.split()[-1]) if procs and err.startswith(b"served") else -1
        if served != len(order):
            raise FailedPrecondition(
                f"the C reference handler served {served} faults, the guest read {len(order)}"
            )
        return {
            "p50_us": round(touched["p50_us"], 1),
            "p99_us": round(touched["p99_us"], 1),
            "max_us": round(touched["max_us"], 1),
            "faults": served,
        }
