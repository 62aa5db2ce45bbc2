"""Drive a process guest (``python -m tiermem.vmm.process_guest --control``) from a test."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any


class GuestProc:
    """A process guest child: send a command line, read its one-line JSON answer."""

    def __init__(
        self, socket_path: str, vm_id: str, memory: str = "16M", *extra: str, timeout: float = 20.0
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tiermem.vmm.process_guest", "--socket", socket_path, "--vm-id", vm_id,
             "--memory", memory, "--mode", "uffd", "--control", "--timeout", str(timeout), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        self.ready = self._read(timeout)
        if not self.ready.get("ready"):
            raise RuntimeError(f"guest did not attach: {self.ready}")

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        out: list[str] = []

        def reader() -> None:
            assert self.proc.stdout is not None
            out.append(self.proc.stdout.readline())

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
            raise TimeoutError(
                f"no answer from the guest in {timeout}s (exit {self.proc.poll()}): {err[-2000:]}"
            )
        data: dict[str, Any] = json.loads(out[0])
        return data

    def cmd(self, line: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send one command; return its answer (raises on an error answer)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ans = self._read(timeout)
        if "error" in ans:
            raise RuntimeError(f"guest command {line!r} failed: {ans['error']}")
        return ans

    def close(self) -> None:
        """Quit (or kill) the guest."""
        if self.proc.poll() is None:
            try:
                self.cmd("quit", timeout=5)
            except Exception:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def pages_spec(pages: list[int]) -> str:
    """``[1,2,3,7]`` -> ``1-3,7``."""
    out: list[str] = []
    ps = sorted(set(pages))
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        out.append(str(ps[i]) if i == j else f"{ps[i]}-{ps[j]}")
        i = j + 1
    return ",".join(out)
