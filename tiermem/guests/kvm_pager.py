"""A minimal userfaultfd pager in a child process, for the KVM VMM's self-tests and benchmark.

It is *not* the node agent: no store, no index, no cycles. It exists so the VMM
can be exercised (and measured) against real userfaultfd faults without an agent:

* the VMM process creates the uffd, registers its guest mapping MISSING|MINOR,
  and passes ``[uffd, memfd]`` to a fresh interpreter (``pass_fds``);
* the child serves MISSING faults with UFFDIO_COPY (the bytes it evicted for that
  page, or zeros for a never-touched page) and MINOR faults with UFFDIO_CONTINUE;
* on request it *evicts* pages: ``pread`` from the memfd, keep the bytes, punch
  the hole, so the next guest access is a MISSING fault; and it reports counts and
  per-fault service times (message read -> resolving ioctl returned).

A separate process, like the real agent: a thread of the VMM that faults while
holding the GIL (a numpy load on the mapping) can never stall the handler.
Evict only while the guest is quiet: a write landing between the ``pread`` and
the punch would be lost (the agent's freeze step exists for this).

Commands on the child's stdin, one JSON reply line each: ``evict P1,P2,...``,
``stats``, ``samples``, ``reset``, ``quit``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import subprocess
import sys
import time
from typing import IO, Any

import numpy as np

from tiermem.errors import TiermemError
from tiermem.kernel import uapi
from tiermem.kernel.uffd_ioctl import Uffd, UffdOpError, new_uffd, punch_hole

__all__ = ["PagerProcess"]

PAGE = 4096
_MAX_SAMPLES = 200_000


class PagerProcess:
    """A child process serving the userfaultfd of one guest mapping (see module doc)."""

    def __init__(self, base: int, size: int, memfd: int) -> None:
        features = uapi.UFFD_FEATURE_MISSING_SHMEM | uapi.UFFD_FEATURE_MINOR_SHMEM
        self.uffd, _ = new_uffd(features)
        self.base, self.size = base, size
        try:
            Uffd(self.uffd).register(
                base, size, uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_MINOR
            )
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tiermem.guests.kvm_pager",
                    str(self.uffd),
                    str(memfd),
                    str(base),
                    str(size),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(self.uffd, memfd),
                text=True,
            )
        except BaseException:
            os.close(self.uffd)
            raise
        self._call("stats")  # the child is up and serving

    def _call(self, line: str) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise TiermemError(f"pager exited (code {self._proc.poll()})")
        out: dict[str, Any] = json.loads(reply)
        if "error" in out:
            raise TiermemError(f"pager: {out['error']}")
        return out

    def evict(self, pages: np.ndarray | list[int]) -> int:
        """Save and punch ``pages`` (guest page indexes); returns how many were evicted now.

        Pages still evicted from an earlier call are skipped (their memfd range is a hole).
        """
        plist = [int(p) for p in pages]
        done = 0
        for lo in range(0, len(plist), 4096):
            done += int(self._call("evict " + ",".join(map(str, plist[lo : lo + 4096])))["evicted"])
        return done

    def stats(self) -> dict[str, Any]:
        """Faults served since the last reset (``missing``, ``minor``) and pages ``held`` (evicted)."""
        return self._call("stats")

    def service_ns(self) -> list[int]:
        """Per-fault service times since the last reset, ns: message read -> resolving ioctl returned."""
        return list(self._call("samples")["service_ns"])

    def reset(self) -> None:
        """Zero the fault counters and latency samples."""
        self._call("reset")

    def close(self) -> None:
        """Stop the child, then unregister and close the uffd (faults after this are ordinary)."""
        if self._proc.poll() is None:
            with contextlib.suppress(OSError, TiermemError, ValueError):
                self._call("quit")
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for f in (self._proc.stdin, self._proc.stdout):
            if f is not None:
                f.close()
        if self.uffd >= 0:
            with contextlib.suppress(OSError):
                Uffd(self.uffd).unregister(self.base, self.size)
            os.close(self.uffd)
            self.uffd = -1


# --- the child -------------------------------------------------------------------------------------
class _Child:
    def __init__(self, uffd: int, memfd: int, base: int, size: int) -> None:
        self.u = Uffd(uffd)
        self.fd, self.memfd, self.base, self.size = uffd, memfd, base, size
        self.held: dict[int, np.ndarray] = {}
        self.zero = np.zeros(PAGE, dtype=np.uint8)
        self.reset()

    def reset(self) -> None:
        self.missing = self.minor = 0
        self.samples: list[int] = []

    def _resolve(self, addr: int, minor: bool) -> None:
        page = (addr - self.base) // PAGE
        dst = self.base + page * PAGE
        while True:
            try:
                if minor:
                    self.u.continue_(dst, PAGE)
                else:
                    src = self.held.get(page, self.zero)
                    self.u.copy(dst, src.ctypes.data, PAGE)
                    self.held.pop(page, None)
                return
            except UffdOpError as e:
                if e.errno == errno.EAGAIN:  # the mapping changed under us: retry
                    continue
                if e.errno == errno.EEXIST:  # already installed (a racing fault on the same page)
                    self.held.pop(page, None)
                    return
                raise

    def serve_faults(self) -> None:
        for msg in self.u.read_msgs():
            t0 = time.perf_counter_ns()
            if msg.event != uapi.UFFD_EVENT_PAGEFAULT:
                continue
            minor = bool(msg.flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR)
            self._resolve(msg.address, minor)
            if minor:
                self.minor += 1
            else:
                self.missing += 1
            if len(self.samples) < _MAX_SAMPLES:
                self.samples.append(time.perf_counter_ns() - t0)

    def command(self, line: str) -> tuple[dict[str, Any], bool]:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "evict":
            n = 0
            for p in (int(x) for x in arg.split(",") if x):
                if not 0 <= p < self.size // PAGE:
                    return {"error": f"page {p} outside guest memory"}, False
                if p in self.held:  # still evicted: the memfd holds a hole, not the page
                    continue
                data = os.pread(self.memfd, PAGE, p * PAGE)
                self.held[p] = np.frombuffer(data, dtype=np.uint8).copy()
                punch_hole(self.memfd, p * PAGE, PAGE)
                n += 1
            return {"evicted": n}, False
        if cmd == "stats":
            return {"missing": self.missing, "minor": self.minor, "held": len(self.held)}, False
        if cmd == "samples":
            return {"service_ns": self.samples}, False
        if cmd == "reset":
            self.reset()
            return {"ok": True}, False
        if cmd == "quit":
            return {"ok": True}, True
        return {"error": f"unknown command {cmd!r}"}, False

    def loop(self, stdin: IO[str], stdout: IO[str]) -> None:
        while True:
            ready, _, _ = select.select([self.fd, stdin.fileno()], [], [])
            if self.fd in ready:
                self.serve_faults()
            if stdin.fileno() in ready:
                self.serve_faults()  # faults first: a vCPU may be waiting
                line = stdin.readline()
                if not line:
                    return
                reply, done = self.command(line)
                stdout.write(json.dumps(reply) + "\n")
                stdout.flush()
                if done:
                    return


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m tiermem.guests.kvm_pager UFFD MEMFD BASE SIZE``."""
    uffd, memfd, base, size = (int(x) for x in (argv or sys.argv[1:]))
    _Child(uffd, memfd, base, size).loop(sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
