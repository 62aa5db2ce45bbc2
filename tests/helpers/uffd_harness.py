"""A minimal fault server and a process-guest driver for the real-kernel backend tests.

``MiniAgent`` is deliberately *not* the node agent: it listens on a handoff
socket, builds each VM's backend with ``HandoffAttach.make_backend`` and runs one
fault thread that serves MISSING faults from an in-memory dict of evicted pages
(COPY) or with ZEROPAGE, resolves sync RWP faults, and records REMOVE events. The
backends are driven through the same ``KernelBackend`` calls the agent makes.
``GuestProc`` runs ``python -m tiermem.guests.process --control`` and speaks
its stdin/stdout line protocol.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers.timing import scaled
from tiermem.handoff.listener import HandoffAttach, HandoffListener
from tiermem.kernel import uapi
from tiermem.kernel.backend import KernelBackend
from tiermem.kernel.uapi import UffdMsg

ROOT = Path(__file__).resolve().parents[2]


class MiniAgent:
    """Handoff listener + one fault thread per attached backend."""

    def __init__(
        self,
        socket_path: Path | str,
        on_attach: Callable[[HandoffAttach], None] | None = None,
        **listener_kw: Any,
    ) -> None:
        self.path = str(socket_path)
        self.attaches: queue.Queue[HandoffAttach] = queue.Queue()
        self._hook = on_attach
        self.listener = HandoffListener(self.path, self._on_attach, **listener_kw).start()
        self.saved: dict[int, bytes] = {}
        self.events: list[UffdMsg] = []
        self.rwp_faults: list[int] = []
        self.minor_faults: list[int] = []
        self.hold_rwp = False
        """When True, sync RWP faults are parked (the vCPU waits) instead of resolved."""
        self.service_us: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _on_attach(self, attach: HandoffAttach) -> None:
        if self._hook is not None:
            self._hook(attach)  # runs before the VMM hears "attached"
        self.attaches.put(attach)

    def wait_attach(self, timeout: float = 10.0) -> HandoffAttach:
        return self.attaches.get(timeout=scaled(timeout))

    def serve(self, backend: KernelBackend) -> None:
        t = threading.Thread(target=self._loop, args=(backend,), daemon=True)
        t.start()
        self._threads.append(t)

    def _loop(self, be: KernelBackend) -> None:
        while not self._stop.is_set() and not be.closed:
            try:
                for m in be.read_messages(0.1):
                    self._handle(be, m)
            except BaseException as e:  # surfaced by the tests through .errors
                self.errors.append(e)
                return

    def _handle(self, be: KernelBackend, m: UffdMsg) -> None:
        if m.event != uapi.UFFD_EVENT_PAGEFAULT:
            with self._lock:
                self.events.append(m)
                if m.event in (uapi.UFFD_EVENT_REMOVE, uapi.UFFD_EVENT_UNMAP):
                    for p in range(be.page_of(m.start), be.page_of(m.end)):
                        self.saved.pop(p, None)  # the guest gave the range up: nothing to restore
            return
        page = be.page_of(m.address)
        if m.flags & uapi.UFFD_PAGEFAULT_FLAG_RWP:
            with self._lock:
                self.rwp_faults.append(page)
            if not self.hold_rwp:
                be.rwprotect(be.addr(page), be.page_size, protect=False)
            return
        if m.flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR:
            # rwp mode registers MINOR too: a page in the memfd but unmapped in the guest mapping (a pwrite,
            # say) faults MINOR; CONTINUE maps it, as the agent does (the uffd backend handles its own)
            with self._lock:
                self.minor_faults.append(page)
            try:
                be.continue_(be.addr(page), be.page_size)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.EFAULT):
                    raise
                be.wake(
                    be.addr(page), be.page_size
                )  # mapped meanwhile, or punched (its retry faults MISSING)
            return
        t0 = time.perf_counter()
        with self._lock:  # taken before the install, so a test never sees a restored page still "saved"
            data = self.saved.pop(page, None)
        try:
            if data is not None:
                be.copy(be.addr(page), data)
            else:
                be.zeropage(be.addr(page), be.page_size)
        except OSError as e:
            if e.errno != errno.EEXIST:  # already installed: success
                if data is not None:
                    with self._lock:
                        self.saved[page] = data
                raise
        with self._lock:
            self.service_us.append((time.perf_counter() - t0) * 1e6)

    def evict(self, be: KernelBackend, pages: np.ndarray) -> None:
        """The v10 eviction step for each page: read via the I/O mapping, keep, punch, wake."""
        for p in pages.tolist():
            data = be.io_read(p * be.page_size, be.page_size)
            with self._lock:
                self.saved[p] = data
            be.punch_hole(p * be.page_size, be.page_size)
            be.wake(be.addr(p), be.page_size)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self.listener.stop()


class GuestProc:
    """``python -m tiermem.guests.process --control`` as a child process."""

    def __init__(
        self,
        socket_path: str,
        vm_id: str,
        *,
        memory: str = "16M",
        workload: str | None = None,
        prefill: bool = True,
        seed: int = 1,
        extra: list[str] | None = None,
        mode: str | None = None,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tiermem.guests.process",
            "--socket",
            socket_path,
            "--vm-id",
            vm_id,
            "--memory",
            memory,
            "--seed",
            str(seed),
            "--control",
        ]
        if mode:  # None: the guest probes the kernel (rwp where it has RWP, else uffd)
            cmd += ["--mode", mode]
        if workload:
            cmd += ["--workload", workload]
        if prefill:
            cmd.append("--prefill")
        cmd += extra or []
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.ready: dict[str, Any] = {}

    def wait_ready(self) -> dict[str, Any]:
        self.ready = self._line()
        assert self.ready.get("ready"), self.ready
        return self.ready

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process guest exited with {self.proc.wait(5)}")
        return dict(json.loads(line))

    def cmd(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self._line()
        assert reply.get("ok"), reply
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def pages_arg(pages: np.ndarray | list[int]) -> str:
    """The PAGES argument of the process guest's commands."""
    return ",".join(str(int(p)) for p in pages)
