"""The ``rwp`` backend: kernels that report UFFD_FEATURE_RWP (userfaultfd RWP, mainline since 7.3).

Same interface and the same agent code as the ``uffd`` backend and the sim, but
every tracking call is the real uapi (``../shared/reference/rwp-uapi.md``):

* the VMM negotiates ``UFFDIO_API(RWP|RWP_ASYNC|MISSING_SHMEM|MINOR_SHMEM|...)`` when it
  creates the uffd (a second UFFDIO_API is EINVAL, so :meth:`RwpBackend.api` only checks
  the features the VMM reported) and registers ``MISSING|MINOR|RWP``. MINOR because a page
  in the memfd's page cache but not mapped in the guest mapping (pte_none: a ``pwrite``,
  a write through another mapping, ``MADV_DONTNEED``, shmem reclaim, a THP split) cannot
  be RWP-protected and never raises an RWP fault, not even in sync mode; with MINOR it
  raises a MINOR fault, which the agent resolves with UFFDIO_CONTINUE. The cycle never
  evicts such a page (the scan does not show it present);
* ``rwprotect`` is ``UFFDIO_RWPROTECT`` (``=QQQ``: start, len, mode);
* ``set_mode`` is ``UFFDIO_SET_MODE`` (``=QQ``: enable, disable);
* ``pagemap_scan`` is ``PAGEMAP_SCAN`` (``=12Q``) on ``/proc/<vmm pid>/pagemap``
  with ``PAGE_IS_ACCESSED``; a ``vec_len`` of 0 ("the whole range") is served by
  repeated calls from ``walk_end``, merging regions split at a chunk boundary.

Faults arrive with ``UFFD_PAGEFAULT_FLAG_RWP`` (or ``MINOR``) straight from the kernel
and are surfaced unchanged. Kernel behaviours the agent relies on (7.3):

* ``SET_MODE(enable=RWP_ASYNC)`` wakes every waiter of the context, MISSING ones included,
  on every call: expect duplicate MISSING messages after each cycle (served idempotently).
* ``UFFDIO_UNREGISTER`` wakes blocked faults only on MISSING-registered ranges.
* Closing the agent's uffd releases nothing while the VMM holds its own fd (it always
  does): if the agent dies with the context in sync mode, vCPUs on protected pages stay
  blocked until an agent re-attaches, and re-attaching sets async mode first.
* ``UFFD_EVENT_REMOVE`` from the VMM's shmem ``MADV_DONTNEED`` keeps the page cache (the
  pages read back unchanged, through a MINOR fault); only ``MADV_REMOVE`` and punching drop
  the data.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence

import numpy as np

from tiermem.kernel import uapi
from tiermem.kernel.backend import ApiInfo, Region, ScanResult
from tiermem.kernel.uffd_base import EAGAIN_BUDGET_S, ControlChannel, RealBackend
from tiermem.kernel.uffd_ioctl import IoctlFn, pagemap_scan

__all__ = ["RWP_NEEDS", "RwpBackend"]

RWP_NEEDS = (
    uapi.UFFD_FEATURE_RWP
    | uapi.UFFD_FEATURE_RWP_ASYNC
    | uapi.UFFD_FEATURE_MISSING_SHMEM
    | uapi.UFFD_FEATURE_MINOR_SHMEM
)
"""Features the VMM must have negotiated for the rwp backend."""
SCAN_CHUNK = 65536
"""Regions fetched per PAGEMAP_SCAN call when the caller asks for the whole range."""


class RwpBackend(RealBackend):
    """Guest memory in a memfd, registered MISSING|MINOR|RWP; tracking by the kernel."""

    name = "rwp"

    def __init__(
        self,
        uffd_fd: int,
        memfd: int,
        regions: Sequence[Region],
        control: ControlChannel | None,
        *,
        vmm_pid: int,
        features: int,
        ioctl: IoctlFn | None = None,
        pagemap_path: str | None = None,
    ) -> None:
        if features & RWP_NEEDS != RWP_NEEDS:
            raise OSError(
                errno.EINVAL,
                "rwp mode needs RWP, RWP_ASYNC, MISSING_SHMEM and MINOR_SHMEM negotiated by the VMM; it reported "
                + (", ".join(uapi.feature_names(features)) or "none"),
            )
        super().__init__(
            uffd_fd, memfd, regions, control=control, vmm_pid=vmm_pid, features=features, ioctl=ioctl
        )
        self._ioctl_fn = ioctl
        self._api_done = False
        try:
            # Needs ptrace-read access to the VMM: same uid or CAP_SYS_PTRACE.
            self._pagemap = os.open(pagemap_path or f"/proc/{vmm_pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self._release(close_fds=False)
            raise
        self.wake_all()

    def _ioctl_call(self, fn: str, *args: int) -> None:
        try:
            getattr(self._uffd, fn)(*args)
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.ENOSPC):
                self._mark_gone(f"{fn}: {e.strerror}")
            raise

    # --- negotiation and registration ---------------------------------------------------------
    def api(self, features: int) -> ApiInfo:
        """The VMM called UFFDIO_API; check ``features`` against what it negotiated."""
        with self._state_lock:
            if self._api_done:
                raise OSError(errno.EINVAL, "UFFDIO_API already called on this uffd")
            if features & uapi.UFFD_FEATURE_RWP_ASYNC and not features & uapi.UFFD_FEATURE_RWP:
                raise OSError(errno.EINVAL, "RWP_ASYNC requires RWP")
            if features & ~self.features:
                names = ", ".join(uapi.feature_names(features & ~self.features))
                raise OSError(errno.EINVAL, f"features not negotiated by the VMM: {names}")
            self._api_done = True
            return ApiInfo(features=self.features, ioctls=uapi.UFFD_API_IOCTLS)

    def register(self, start: int, length: int, mode: int) -> int:
        """UFFDIO_REGISTER on the VMM's mm (re-registering MISSING|MINOR|RWP is allowed)."""
        self._check_range(start, length)
        with self._state_lock:
            return self._uffd.register(start, length, mode)

    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER (the kernel wakes blocked faults only if the range was MISSING-registered)."""
        self._check_range(start, length)
        with self._state_lock:
            self._uffd.unregister(start, length)

    # --- tracking -------------------------------------------------------------------------------
    def rwprotect(self, start: int, length: int, *, protect: bool, dontwake: bool = False) -> None:
        """UFFDIO_RWPROTECT(range, MODE_RWP) or (range, 0|DONTWAKE)."""
        self._check_range(start, length)
        mode = uapi.UFFDIO_RWPROTECT_MODE_RWP if protect else 0
        if dontwake:
            mode |= uapi.UFFDIO_RWPROTECT_MODE_DONTWAKE
        deadline = time.monotonic() + EAGAIN_BUDGET_S
        while True:
            try:
                self._ioctl_call("rwprotect", start, length, mode)
                return
            except OSError as e:
                # EAGAIN = mmap_changing: an unread REMOVE/UNMAP event; read it and retry.
                if e.errno != errno.EAGAIN or time.monotonic() > deadline:
                    raise
                self._service_events()
                time.sleep(0.0001)

    def set_mode(self, *, enable: int = 0, disable: int = 0) -> None:
        """UFFDIO_SET_MODE(enable, disable)."""
        if self._closed or self._gone:
            raise OSError(errno.ESRCH, "the VMM is gone or the backend is closed")
        self._ioctl_call("set_mode", enable, disable)

    def pagemap_scan(
        self,
        start: int,
        end: int,
        *,
        category_mask: int = 0,
        category_inverted: int = 0,
        category_anyof_mask: int = 0,
        return_mask: int = 0,
        max_pages: int = 0,
        vec_len: int = 0,
    ) -> ScanResult:
        """PAGEMAP_SCAN on the VMM's pagemap; ``vec_len`` 0 loops from ``walk_end`` to ``end``."""
        if self._closed or self._gone:
            raise OSError(errno.ESRCH, "the VMM is gone or the backend is closed")
        masks = {
            "category_mask": category_mask,
            "category_inverted": category_inverted,
            "category_anyof_mask": category_anyof_mask,
            "return_mask": return_mask,
        }
        whole = vec_len == 0
        chunk = vec_len or max(1, min(SCAN_CHUNK, -(-(end - start) // self.page_size)))
        parts: list[np.ndarray] = []
        pos, left = start, max_pages
        while True:
            vec = np.zeros(chunk, dtype=uapi.PAGE_REGION_DTYPE)
            n, walk_end = pagemap_scan(
                self._pagemap, pos, end, vec, max_pages=left, ioctl=self._ioctl_fn, **masks
            )
            got = vec[:n]
            parts.append(got)
            if left:
                left -= int(((got["end"] - got["start"]) // self.page_size).sum())
            if not whole or walk_end >= end or n < chunk or (max_pages and left <= 0) or walk_end <= pos:
                break
            pos = walk_end
        return ScanResult(_merge(np.concatenate(parts)), int(walk_end))

    def _before_close(self) -> None:
        # Nothing to resolve here, and closing resolves nothing either: the VMM holds its own fd of
        # this context, and only the last fd's release drops RWP protection. A detach leaves the
        # context in async mode (the cycle's finally), so no vCPU stays blocked.
        pass

    def _release(self, *, close_fds: bool) -> None:
        fd = getattr(self, "_pagemap", -1)
        if fd >= 0:
            os.close(fd)
            self._pagemap = -1
        super()._release(close_fds=close_fds)


def _merge(regions: np.ndarray) -> np.ndarray:
    """Merge adjacent regions with equal categories (a region split between two scan calls)."""
    if len(regions) < 2:
        return regions
    keep = np.ones(len(regions), dtype=bool)
    keep[1:] = (regions["start"][1:] != regions["end"][:-1]) | (
        regions["categories"][1:] != regions["categories"][:-1]
    )
    idx = np.flatnonzero(keep)
    out = regions[idx].copy()
    last = np.append(idx[1:], len(regions)) - 1
    out["end"] = regions["end"][last]
    return out
