"""Drive a process guest (``python -m tiermem.guests.process --control``) from a test.

The driver itself is the benchmarks' :class:`tiermem.bench.common.GuestDriver` (one
command line, one JSON answer; an error answer raises FailedPrecondition); this module
only sets the tests' defaults.
"""

from __future__ import annotations

from typing import Any

from tests.helpers.timing import scaled
from tiermem.bench.common import GuestDriver
from tiermem.bench.common import pages_spec as _ordered_spec


class GuestProc(GuestDriver):
    """A process guest child with the tests' defaults: 16 MiB, a 20 s handoff timeout, 60 s per command.

    ``mode`` ``auto`` follows the kernel probe (rwp on an RWP kernel, else uffd), as a real VMM would.
    """

    def __init__(
        self,
        socket_path: str,
        vm_id: str,
        memory: str = "16M",
        *extra: str,
        timeout: float = 20.0,
        mode: str = "auto",
    ) -> None:
        super().__init__(socket_path, vm_id, memory, *extra, timeout=scaled(timeout), mode=mode)

    def cmd(self, line: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send one command; return its answer (raises on an error answer)."""
        return super().cmd(line, scaled(timeout))


def pages_spec(pages: list[int]) -> str:
    """``[3,1,2,7]`` -> ``1-3,7`` (sorted, duplicates dropped)."""
    return _ordered_spec(sorted(set(pages)))
