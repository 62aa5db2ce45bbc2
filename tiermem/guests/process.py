"""A process guest: a plain process whose "guest RAM" is a GuestMemory handed over to the agent.

It runs guest workloads (:mod:`tiermem.sim.workloads`) as real loads and stores
on its guest mapping (each write increments the page's u32 counter and stamps its
index, :mod:`tiermem.sim.content`), keeps the expected counters, and verifies
every page through the guest mapping (evicted pages fault back in). It is the
real-kernel test guest when KVM is not wanted::

    python -m tiermem.guests.process --socket PATH --vm-id ID --memory 64M \\
        --workload hotset:0.1 --seed 1 --batches 100            # run, verify, print JSON, exit

With ``--control`` it then reads commands on stdin, one per line, and answers each
with one JSON line on stdout, so a test can interleave agent cycles with guest
activity deterministically:

    run N              N workload batches; answer lists the pages touched
    touch PAGES [r|w]  touch pages one by one (default: write); answer has per-touch latency
    verify             check every page; answer has the mismatch count and the first few
    balloon PAGES      give pages back like a balloon driver (MADV_REMOVE: they read as zeroes)
    hot                the workload's hot pages
    ping | quit

``PAGES`` is ``1,5,10-20`` (ranges inclusive). The first line printed is
``{"ready": true, ...}`` once the agent has accepted the handoff.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from tiermem.errors import InvalidArgument, TiermemError
from tiermem.handoff.client import GuestMemory
from tiermem.kernel import uapi
from tiermem.kernel.uffd_ioctl import madvise
from tiermem.sim import content
from tiermem.sim.workloads import ExpectedCounters, Workload, parse_workload
from tiermem.units import parse_memory

__all__ = ["ProcessGuest", "main", "parse_pages"]


def parse_pages(spec: str, n_pages: int) -> np.ndarray:
    """``1,5,10-20`` -> int64 array of pages (ranges inclusive); InvalidArgument if out of range."""
    out: list[np.ndarray] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise InvalidArgument(f"bad page spec {part!r}") from None
        if not 0 <= lo <= hi < n_pages:
            raise InvalidArgument(f"pages {part!r} outside 0..{n_pages - 1}")
        out.append(np.arange(lo, hi + 1, dtype=np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class ProcessGuest:
    """Guest activity on a GuestMemory, with the expected counters to verify it."""

    def __init__(self, gm: GuestMemory, workload: Workload | None, seed: int = 0) -> None:
        self.gm = gm
        self.n_pages = gm.size // gm.page_size
        self.image = np.frombuffer(gm.view, dtype=np.uint8)
        self._w32 = self.image.view("<u4")
        self._w64 = self.image.view("<u8")
        self._ps = gm.page_size
        self.expected = ExpectedCounters(self.n_pages)
        self.workload = workload
        self._batches = workload.batches(stream=seed) if workload is not None else None

    def prefill(self) -> None:
        """Write every page once through the memfd (a loaded image: cached, not yet mapped)."""
        ones = np.ones(self.n_pages, dtype=np.uint32)
        data = content.pages_bytes(np.arange(self.n_pages), ones, self._ps)
        view = memoryview(data)
        off = 0
        while off < len(data):
            off += os.pwrite(self.gm.memfd, view[off:], off)
        self.expected.counts[:] = 1

    def run(self, n: int) -> dict[str, Any]:
        """Apply ``n`` workload batches as real loads and stores."""
        if self._batches is None:
            raise InvalidArgument("no workload: start the guest with --workload")
        touched: list[np.ndarray] = []
        reads = writes_n = 0
        for _ in range(n):
            pages, writes = next(self._batches)
            pages = np.asarray(pages, dtype=np.int64)
            writes = np.asarray(writes, dtype=bool)
            r = pages[~writes]
            if len(r):
                int(self._w32[r * (self._ps // 4)].sum())  # the loads fault like guest reads
            content.apply_writes(self.image, pages[writes], self._ps)
            self.expected.apply(pages, writes)
            touched.append(pages)
            reads += len(r)
            writes_n += int(writes.sum())
        uniq = np.unique(np.concatenate(touched)) if touched else np.zeros(0, dtype=np.int64)
        return {"batches": n, "reads": reads, "writes": writes_n, "touched": uniq.tolist()}

    def touch(self, pages: np.ndarray, write: bool) -> dict[str, Any]:
        """Touch ``pages`` one at a time, timing each access (a fault's full round trip)."""
        lat = np.zeros(len(pages))
        words = self._ps // 4
        for i, p in enumerate(pages.tolist()):
            t0 = time.perf_counter()
            if write:
                self._w32[p * words] += 1
                self._w64[p * (self._ps // 8) + content.PAGE_INDEX_OFFSET // 8] = p
            else:
                int(self._w32[p * words])
            lat[i] = time.perf_counter() - t0
        if write:
            self.expected.apply(pages, np.ones(len(pages), dtype=bool))
        us = lat * 1e6
        stats = (
            {
                "p50_us": float(np.percentile(us, 50)),
                "p99_us": float(np.percentile(us, 99)),
                "max_us": float(us.max()),
            }
            if len(us)
            else {}
        )
        return {"pages": len(pages), **stats}

    def balloon(self, pages: np.ndarray) -> dict[str, Any]:
        """MADV_REMOVE each page (the agent sees UFFD_EVENT_REMOVE); the pages read as zeroes after."""
        for p in np.unique(pages).tolist():
            madvise(self.gm.base + p * self._ps, self._ps, uapi.MADV_REMOVE)
        self.expected.counts[pages] = 0
        return {"pages": len(np.unique(pages))}

    def verify(self) -> dict[str, Any]:
        """Read every page through the guest mapping and compare with the expected counters."""
        ctr, valid = content.decode_pages(self.image, 0, self._ps)
        bad = np.flatnonzero(~valid | (ctr != self.expected.counts))
        first = [
            {
                "page": int(p),
                "counter": int(ctr[p]),
                "expected": int(self.expected.counts[p]),
                "valid": bool(valid[p]),
            }
            for p in bad[:20]
        ]
        return {"pages": self.n_pages, "mismatches": len(bad), "first": first}


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _command(guest: ProcessGuest, line: str) -> tuple[dict[str, Any], bool]:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "run":
        return guest.run(int(arg or "1")), False
    if cmd == "touch":
        spec, _, rw = arg.strip().partition(" ")
        if rw.strip() not in ("", "r", "w"):
            raise InvalidArgument("touch PAGES [r|w]")
        return guest.touch(parse_pages(spec, guest.n_pages), rw.strip() != "r"), False
    if cmd == "verify":
        return guest.verify(), False
    if cmd == "balloon":
        return guest.balloon(parse_pages(arg, guest.n_pages)), False
    if cmd == "hot":
        hot = guest.workload.hot_pages(0) if guest.workload is not None else None
        return {"hot": None if hot is None else [int(p) for p in hot]}, False
    if cmd == "ping":
        return {"attached": guest.gm.attached.is_set(), "zaps": guest.gm.zaps}, False
    if cmd == "quit":
        return {}, True
    raise InvalidArgument(
        f"unknown command {cmd!r}: run N | touch PAGES [r|w] | verify | balloon PAGES | hot | ping | quit"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tiermem.guests.process``."""
    ap = argparse.ArgumentParser(prog="python -m tiermem.guests.process", description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True, help="the agent's handoff socket")
    ap.add_argument("--vm-id", required=True)
    ap.add_argument("--memory", default="64M", help="guest RAM, QEMU style (64M, 1G)")
    ap.add_argument("--mode", choices=("uffd", "rwp"), default=None, help="default: probe the kernel")
    ap.add_argument("--workload", default=None, help="e.g. hotset:0.1, zipf:1.1 (tiermem.sim.workloads)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batches", type=int, default=0, help="workload batches to run before verifying")
    ap.add_argument("--prefill", action="store_true", help="write every page once before the handoff")
    ap.add_argument("--control", action="store_true", help="then take commands on stdin")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the agent")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="start a new incarnation even if an earlier VMM's evicted pages exist under this id",
    )
    args = ap.parse_args(argv)
    try:
        size = parse_memory(args.memory)
        gm = GuestMemory.create(args.vm_id, size, mode=args.mode)
    except (TiermemError, OSError) as e:
        _emit({"ready": False, "error": str(e)})
        return 2
    try:
        n_pages = size // gm.page_size
        workload = parse_workload(args.workload, n_pages, args.seed) if args.workload else None
        guest = ProcessGuest(gm, workload, args.seed)
        if args.prefill:
            guest.prefill()
        gm.handoff(args.socket, timeout=args.timeout, fresh=args.fresh)
        _emit(
            {
                "ready": True,
                "vm_id": gm.vm_id,
                "pid": os.getpid(),
                "mode": gm.mode,
                "base": gm.base,
                "size": gm.size,
                "pages": n_pages,
                "incarnation": gm.incarnation,
            }
        )
        if args.batches:
            guest.run(args.batches)
        if not args.control:
            result = guest.verify()
            _emit({"done": True, **result})
            return 0 if result["mismatches"] == 0 else 1
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                reply, stop = _command(guest, line)
                _emit({"ok": True, **reply})
            except (TiermemError, ValueError) as e:
                _emit({"ok": False, "error": str(e)})
                continue
            if stop:
                break
        return 0
    except (TiermemError, OSError) as e:
        _emit({"ready": False, "error": str(e)})
        return 2
    finally:
        gm.close()


if __name__ == "__main__":
    sys.exit(main())
