"""Drive a process guest (``python -m tiermem.guests.process --control``) from a test.

The driver itself is the benchmarks' :class:`tiermem.bench.common.GuestDriver` (one
command line, one JSON answer; an error answer raises FailedPrecondition); this module
only sets the tests' defaults.
"""

from __future__ import annotations

from typing import Any

from tiermem.bench.common import GuestDriver
from tiermem.bench.common import pages_spec as _ordered_spec


class GuestProc(GuestDriver):
    """A process guest child with the tests' defaults: 16 MiB, a 20 s handoff timeout, 60 s per command."""

    def __init__(
        self, socket_path: str, vm_id: str, memory: str = "16M", *extra: str, timeout: float = 20.0
    ) -> None:
        super().__init__(socket_path, vm_id, memory, *extra, timeout=timeout)

    def cmd(self, line: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send one command; return its answer (raises on an error answer)."""
        return super().cmd(line, timeout)


def pages_spec(pages: list[int]) -> str:
    """``[3,1,2,7]`` -> ``1-3,7`` (sorted, duplicates dropped)."""
    return _ordered_spec(sorted(set(pages)))
