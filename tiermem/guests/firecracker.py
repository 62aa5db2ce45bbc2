"""A process that restores guest memory exactly like Firecracker's ``--uffd`` snapshot load.

What Firecracker does (``src/vmm/src/persist.rs``, see docs/handoff.md §7), step by step:

* guest memory is **private anonymous** memory (``MAP_PRIVATE|MAP_ANONYMOUS``), one
  mapping per region; regions may have holes between them (collapsed MMIO gaps) while
  their ``offset`` fields in the snapshot memory file are contiguous;
* a userfaultfd created with ``UFFDIO_API`` requiring ``EVENT_REMOVE`` only, then
  ``UFFDIO_REGISTER`` of every region in MISSING mode;
* **one** ``sendmsg`` carrying the uffd (SCM_RIGHTS) and the compact JSON array of
  ``GuestRegionUffdMapping`` (serde_json output), on a socket it never reads and
  never closes while it runs;
* vCPU threads then touch guest memory; the balloon gives pages back with
  ``MADV_DONTNEED`` (a ``UFFD_EVENT_REMOVE`` for the handler).

Used by the restore tests and ``tiermem bench restore``::

    python -m tiermem.guests.firecracker --socket PATH --regions 32M,32M [--hole 1M]
        [--vcpus 2] [--variant current|page_size_kib|page_size_kib_kib|bare]

It prints ``{"handshake": ..., "pid": ...}`` once the handshake is sent, then reads
commands on stdin, one JSON answer per line (``PAGES`` are snapshot-file pages,
``1,5,10-20``):

    touch PAGES       vCPU threads read one byte of each page; blocks until all are served
    start PAGES       the same in the background; ``progress`` tells how many are done
    progress          {"done": n, "total": n, "first_touch_s": seconds or null}
    dump PATH         touch everything, then write guest memory in snapshot-file order to PATH
    zero PAGES        which of PAGES read as all zeroes (touching them)
    balloon PAGES     MADV_DONTNEED on PAGES, like Firecracker's balloon device
    quit
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tiermem.guests.process import parse_pages
from tiermem.kernel import uapi
from tiermem.kernel.uffd_ioctl import Uffd, madvise, new_uffd
from tiermem.units import parse_memory

__all__ = ["VARIANTS", "FirecrackerGuest", "FirecrackerProcess", "main"]

PS = 4096
MADV_DONTNEED = 4
VARIANTS = ("current", "page_size_kib", "page_size_kib_kib", "bare")
"""Handshake variants: today's (page_size and the deprecated page_size_kib, both in bytes),
page_size_kib alone in bytes, page_size_kib alone in KiB (older releases), no page size (v1.4)."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_MAP_FIXED = 0x10


class FirecrackerGuest:
    """Guest memory regions, their uffd and the handshake, as Firecracker sets them up."""

    def __init__(self, sizes: list[int], hole: int = 0, vcpus: int = 2) -> None:
        if not sizes or any(s <= 0 or s % PS for s in sizes) or hole % PS:
            raise ValueError("region sizes and the hole must be positive multiples of 4096")
        span = sum(sizes) + hole * (len(sizes) - 1)
        area = _libc.mmap(None, span, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if area in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        self.bases: list[int] = []
        pos = area
        for s in sizes:  # memory::anonymous per region; the hole stays PROT_NONE and unregistered
            got = _libc.mmap(
                pos,
                s,
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED,
                -1,
                0,
            )
            if got != pos:
                raise OSError(ctypes.get_errno(), "mmap of a region failed")
            self.bases.append(pos)
            pos += s + hole
        self.sizes = sizes
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.n_pages = sum(sizes) // PS
        # UffdBuilder::new().require_features(EVENT_REMOVE).close_on_exec(true).non_blocking(true)
        self.uffd, _ = new_uffd(uapi.UFFD_FEATURE_EVENT_REMOVE)
        for b, s in zip(self.bases, sizes, strict=True):
            Uffd(self.uffd).register(b, s, uapi.UFFDIO_REGISTER_MODE_MISSING)  # the crate's default mode
        self.vcpus = max(vcpus, 1)
        self._pool = ThreadPoolExecutor(max_workers=self.vcpus, thread_name_prefix="vcpu")
        self.sock: socket.socket | None = None
        self._done = 0
        self._total = 0
        self._first_touch: float | None = None
        self._started = 0.0
        self._lock = threading.Lock()

    # --- the handshake -------------------------------------------------------------------------
    def mappings(self, variant: str = "current") -> list[dict[str, int]]:
        """``Vec<GuestRegionUffdMapping>`` as this Firecracker variant serialises it."""
        out: list[dict[str, int]] = []
        for b, s, off in zip(self.bases, self.sizes, self.offsets, strict=True):
            m = {"base_host_virt_addr": b, "size": s, "offset": off}
            if variant == "current":
                m |= {"page_size": PS, "page_size_kib": PS}
            elif variant == "page_size_kib":
                m["page_size_kib"] = PS
            elif variant == "page_size_kib_kib":
                m["page_size_kib"] = PS // 1024
            elif variant != "bare":
                raise ValueError(f"unknown handshake variant {variant!r}")
            out.append(m)
        return out

    def handshake(self, path: str, variant: str = "current") -> bytes:
        """send_uffd_handshake: one sendmsg, one fd, compact JSON; the socket is kept, never read."""
        payload = json.dumps(self.mappings(variant), separators=(",", ":")).encode()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.uffd]))])
        self.sock = s  # std::mem::forget(socket)
        return payload

    # --- guest activity ------------------------------------------------------------------------
    def addr(self, page: int) -> int:
        """Host address of snapshot-file page ``page``."""
        off = page * PS
        for b, s, o in zip(self.bases, self.sizes, self.offsets, strict=True):
            if o <= off < o + s:
                return b + off - o
        raise ValueError(f"page {page} is outside guest memory")

    def _touch_one(self, page: int) -> None:
        buf = ctypes.create_string_buffer(1)
        ctypes.memmove(buf, self.addr(page), 1)  # a ctypes call releases the GIL while the vCPU faults
        with self._lock:
            self._done += 1
            if self._first_touch is None:
                self._first_touch = time.perf_counter() - self._started

    def _touch_all(self, pages: np.ndarray) -> None:
        for p in pages:
            self._touch_one(int(p))

    def start(self, pages: np.ndarray) -> None:
        """vCPU threads touch ``pages`` (split in contiguous chunks, one per vCPU) in the background."""
        with self._lock:
            self._done, self._total, self._first_touch = 0, int(pages.size), None
            self._started = time.perf_counter()
        for chunk in np.array_split(pages, self.vcpus):
            self._pool.submit(self._touch_all, chunk)

    def progress(self) -> dict[str, Any]:
        """Pages touched so far by the last ``start``."""
        with self._lock:
            return {"done": self._done, "total": self._total, "first_touch_s": self._first_touch}

    def touch(self, pages: np.ndarray) -> dict[str, Any]:
        """Touch and wait until every page was served."""
        self.start(pages)
        while True:
            p = self.progress()
            if p["done"] >= p["total"]:
                return p | {"seconds": time.perf_counter() - self._started}
            time.sleep(0.001)

    def dump(self, path: str) -> dict[str, Any]:
        """Touch every page with the vCPUs, then write guest memory in snapshot-file order."""
        t = self.touch(np.arange(self.n_pages, dtype=np.int64))
        with open(path, "wb") as f:
            for b, s in zip(self.bases, self.sizes, strict=True):
                f.write(ctypes.string_at(b, s))
        return t | {"bytes": sum(self.sizes)}

    def zero(self, pages: np.ndarray) -> list[int]:
        """Pages of ``pages`` that read as all zeroes."""
        return [int(p) for p in pages if not any(ctypes.string_at(self.addr(int(p)), PS))]

    def balloon(self, pages: np.ndarray) -> None:
        """MADV_DONTNEED, as the balloon device does for private anonymous guest memory."""
        for p in pages:
            madvise(self.addr(int(p)), PS, MADV_DONTNEED)


class FirecrackerProcess:
    """The parent side: runs ``python -m tiermem.guests.firecracker`` and speaks its line protocol."""

    def __init__(
        self,
        socket_path: str,
        regions: str,
        *,
        hole: str = "0",
        vcpus: int = 2,
        variant: str = "current",
        timeout: float = 30.0,
    ) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tiermem.guests.firecracker",
                "--socket",
                socket_path,
                "--regions",
                regions,
                "--hole",
                hole,
                "--vcpus",
                str(vcpus),
                "--variant",
                variant,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self.hello = self._read(timeout)

    def _read(self, timeout: float) -> dict[str, Any]:
        out: list[str] = []
        t = threading.Thread(
            target=lambda: out.append(self.proc.stdout.readline() if self.proc.stdout else ""), daemon=True
        )
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            err = self.proc.stderr.read()[-800:] if self.proc.poll() is not None and self.proc.stderr else ""
            raise TimeoutError(f"firecracker-like guest: no answer in {timeout:.0f} s {err}".strip())
        data: dict[str, Any] = json.loads(out[0])
        return data

    def cmd(self, line: str, timeout: float = 120.0) -> dict[str, Any]:
        """Send one command and return its JSON answer (RuntimeError on an error answer)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ans = self._read(timeout)
        if "error" in ans:
            raise RuntimeError(f"firecracker-like guest: {line.split()[0]} failed: {ans['error']}")
        return ans

    def kill(self) -> None:
        """SIGKILL, as when Firecracker crashes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        """Quit (blocked vCPUs included: the child exits without joining them), or kill."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def _answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tiermem.guests.firecracker``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--regions", required=True, help="region sizes, comma separated (32M,32M)")
    ap.add_argument("--hole", default="0", help="gap between regions in the address space")
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--variant", choices=VARIANTS, default="current")
    a = ap.parse_args(argv)
    g = FirecrackerGuest([parse_memory(x) for x in a.regions.split(",")], parse_memory(a.hole), a.vcpus)
    payload = g.handshake(a.socket, a.variant)
    _answer({"handshake": payload.decode(), "pid": os.getpid(), "pages": g.n_pages})
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "touch":
                _answer(g.touch(parse_pages(arg, g.n_pages)))
            elif cmd == "start":
                g.start(parse_pages(arg, g.n_pages))
                _answer({"started": True})
            elif cmd == "progress":
                _answer(g.progress())
            elif cmd == "dump":
                _answer(g.dump(arg))
            elif cmd == "zero":
                _answer({"zero": g.zero(parse_pages(arg, g.n_pages))})
            elif cmd == "balloon":
                g.balloon(parse_pages(arg, g.n_pages))
                _answer({"ballooned": True})
            elif cmd == "quit":
                break
            else:
                _answer({"error": f"unknown command {cmd!r}"})
        except Exception as e:  # the test reads the error; the guest keeps running
            _answer({"error": f"{type(e).__name__}: {e}"})
    os._exit(0)  # vCPU threads may still be blocked in a fault: do not wait for them


if __name__ == "__main__":
    sys.exit(main())
