"""The demo's guests: sim VMs (inside the agent), process guests (real uffd) and KVM guests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from tiermem.errors import FailedPrecondition

__all__ = ["DemoGuest", "ProcessGuestHandle", "SimGuestHandle"]


class DemoGuest(Protocol):
    """What the demo needs from a guest."""

    vm_id: str
    workload: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def verify(self) -> tuple[int, int]: ...


@dataclass
class SimGuestHandle:
    """A sim VM: its guest runs inside the agent; verification asks the agent."""

    vm_id: str
    workload: str
    verify_fn: Any = None

    def start(self) -> None:
        """Nothing to do: the agent started the guest's vCPUs on attach."""

    def stop(self) -> None:
        """Nothing to do: detaching the VM stops it."""

    def verify(self) -> tuple[int, int]:
        """(pages checked, mismatches)."""
        checked, bad, supported = self.verify_fn(self.vm_id)
        if not supported:
            raise FailedPrecondition(f"{self.vm_id} cannot be verified")
        return checked, bad


@dataclass
class ProcessGuestHandle:
    """A process guest (real loads and stores on a uffd-registered memfd), driven over stdin/stdout."""

    vm_id: str
    workload: str
    socket_path: str
    memory: str = "64M"
    seed: int = 1
    mode: str = "uffd"
    """How the guest registers its memory: ``uffd`` (MINOR-emulated RWP) or ``rwp`` (the kernel's)."""
    period_s: float = 0.02
    proc: subprocess.Popen[str] | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    error: str = ""

    def spawn(self, timeout: float = 20.0) -> None:
        """Start the process; returns once the agent accepted its handoff."""
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tiermem.guests.process",
                "--socket",
                self.socket_path,
                "--vm-id",
                self.vm_id,
                "--memory",
                self.memory,
                "--workload",
                self.workload,
                "--seed",
                str(self.seed),
                "--mode",
                self.mode,
                "--control",
                "--timeout",
                str(timeout),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        ready = self._read()
        if not ready.get("ready"):
            raise FailedPrecondition(f"process guest {self.vm_id} did not attach: {ready}")
        if ready.get("mode") != self.mode:
            raise FailedPrecondition(
                f"process guest {self.vm_id} registered {ready.get('mode')}, not {self.mode}"
            )

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise FailedPrecondition(f"process guest {self.vm_id} exited ({self.proc.poll()})")
        data: dict[str, Any] = json.loads(line)
        return data

    def _cmd(self, line: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return self._read()

    def start(self) -> None:
        """Run workload batches continuously on a thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"guest-{self.vm_id}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._cmd("run 1")
            except Exception as e:  # reported by verify()
                self.error = str(e)
                return

    def stop(self) -> None:
        """Stop issuing batches."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def verify(self) -> tuple[int, int]:
        """Every page read through the guest mapping (evicted ones fault back)."""
        self.stop()
        ans = self._cmd("verify")
        if "error" in ans:
            raise FailedPrecondition(f"{self.vm_id}: {ans['error']}")
        return int(ans["pages"]), int(ans["mismatches"])

    def close(self) -> None:
        """Quit the process."""
        self.stop()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._cmd("quit")
                self.proc.wait(5)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class KvmGuestHandle:
    """A real KVM guest under the reference VMM, its RAM handed to the agent."""

    vm_id: str
    workload: str
    socket_path: str
    memory_bytes: int
    seed: int = 1
    vm: Any = None
    _thread: threading.Thread | None = None
    error: str = ""

    def spawn(self) -> None:
        """Boot the VM and hand its memory to the agent; every page gets an initial image."""
        from tiermem.guests.kvm import KvmVm

        self.vm = KvmVm(self.vm_id, self.memory_bytes, vcpus=1, workload_spec=self.workload, seed=self.seed)
        self.vm.start(self.socket_path)
        self.vm.prefill()

    def start(self) -> None:
        """Run the workload on the vCPU until stopped."""
        self._thread = threading.Thread(target=self._run, name=f"kvm-{self.vm_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.vm.run(24 * 3600.0, verify=False)
        except Exception as e:  # reported by verify()
            self.error = str(e)

    def stop(self) -> None:
        """Stop the vCPUs (after their current batch)."""
        if self.vm is not None:
            self.vm.stop()
        if self._thread is not None:
            self._thread.join(30)

    def verify(self) -> tuple[int, int]:
        """Every page read through the VMM's guest mapping (evicted pages fault back through the agent)."""
        self.stop()
        if self.error:
            raise FailedPrecondition(f"{self.vm_id}: {self.error}")
        checked, bad = self.vm.verify()
        return int(checked), int(bad)

    def close(self) -> None:
        """Shut the VM down."""
        if self.vm is not None:
            self.vm.close()
