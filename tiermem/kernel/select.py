"""Pick a kernel backend by probing the host, never by kernel version.

``rwp`` when the kernel reports UFFD_FEATURE_RWP and RWP_ASYNC and PAGEMAP_SCAN
accepts PAGE_IS_ACCESSED; else ``uffd`` when userfaultfd works with MINOR_SHMEM;
else ``sim``. The probe (:func:`tiermem.kernel.probe.probe_host`) opens a
throwaway userfaultfd with ``UFFDIO_API(features=0)``.
"""

from __future__ import annotations

from tiermem.errors import FailedPrecondition, InvalidArgument
from tiermem.kernel.probe import HostReport, probe_host

__all__ = ["BACKENDS", "choose_backend"]

BACKENDS = ("rwp", "uffd", "sim")
"""Known backends, most capable first."""


def choose_backend(preferred: str | None = None, *, report: HostReport | None = None) -> str:
    """The backend to use: ``preferred`` if this host can run it, else the best available.

    ``None`` or ``"auto"`` picks the best; an explicit choice the host cannot run
    raises FailedPrecondition with the probe's reason; an unknown name raises
    InvalidArgument.
    """
    if preferred is not None and preferred not in (*BACKENDS, "auto"):
        raise InvalidArgument(f"unknown kernel backend {preferred!r}: use auto, {', '.join(BACKENDS)}")
    rep = report or probe_host()
    if preferred in (None, "auto"):
        return next(b for b in BACKENDS if rep.backends.get(b, b == "sim"))
    if not rep.backends.get(preferred, preferred == "sim"):
        reason = rep.reasons.get(preferred, "not available")
        raise FailedPrecondition(f"kernel backend {preferred!r} cannot run on this host: {reason}")
    return preferred
