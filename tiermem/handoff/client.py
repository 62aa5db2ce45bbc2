"""The VMM side of the handoff: what a VMM embeds to put its guest memory under tiermem.

:meth:`GuestMemory.create` makes the memfd, the MAP_SHARED guest mapping and the
userfaultfd (UFFDIO_API with the features the mode needs and the kernel offers;
UFFDIO_REGISTER of the whole mapping: MISSING|MINOR in ``uffd`` mode, MISSING|MINOR|RWP
in ``rwp`` mode). The guest mapping gets MADV_NOHUGEPAGE: RWP tracks 4 KiB PTEs, and
protecting a shmem THP splits it, which unmaps it (pte_none pages that nothing tracks). :meth:`GuestMemory.handoff` sends ``[uffd, memfd]`` and the
JSON description to the agent, then serves the agent's requests on a background
thread: ``zap`` (MADV_DONTNEED of guest ranges, done here because only the owning
process can zap shmem PTEs on stock kernels), ``ping`` and ``detach``. If the
agent goes away the thread reconnects and re-sends the fds (``reattach``);
meanwhile vCPUs touching evicted pages simply wait in the kernel.

Every guest access (vCPU or device emulation) must go through ``view``/``base``:
a second mapping of the memfd would bypass the uffd and race evictions.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from typing import Any

from tiermem import errors
from tiermem.handoff.wire import PROTOCOL_VERSION, FrameReader, ProtocolError, encode_frame, send_frame
from tiermem.kernel import uapi
from tiermem.kernel.backend import TRACKED_REGISTER_MODE, ApiInfo
from tiermem.kernel.probe import open_userfaultfd, uffd_api_features
from tiermem.kernel.uffd_base import mmap_page_size
from tiermem.kernel.uffd_ioctl import Mapping, Uffd, madvise, memfd_create
from tiermem.model import validate_id

__all__ = ["MODE_FEATURES", "OPTIONAL_FEATURES", "GuestMemory", "arm_uffd", "no_huge_pages", "pick_mode"]

# stdlib logging, not structlog: this module runs inside the VMM's own process, whose logging setup is
# the VMM's; an unconfigured structlog would print to its stdout (docs/architecture.md, "Logging").
log = logging.getLogger(__name__)

MODE_FEATURES = {
    "uffd": uapi.UFFD_FEATURE_MISSING_SHMEM | uapi.UFFD_FEATURE_MINOR_SHMEM,
    "rwp": uapi.UFFD_FEATURE_MISSING_SHMEM
    | uapi.UFFD_FEATURE_MINOR_SHMEM
    | uapi.UFFD_FEATURE_RWP
    | uapi.UFFD_FEATURE_RWP_ASYNC,
}
"""Features each mode cannot work without."""
OPTIONAL_FEATURES = uapi.UFFD_FEATURE_EVENT_REMOVE | uapi.UFFD_FEATURE_THREAD_ID | uapi.UFFD_FEATURE_POISON
"""Requested when the kernel offers them: balloon REMOVE events, faulting thread ids, UFFDIO_POISON
(the agent's answer to a page lost from its store, when the policy asks for it).
Not EVENT_UNMAP: a munmap would block until the agent reads the event."""
MODE_REGISTER = {
    "uffd": uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_MINOR,
    "rwp": TRACKED_REGISTER_MODE,
}
"""rwp co-registers MINOR: a page cached in the memfd but unmapped in the guest mapping cannot be
RWP-protected and never raises an RWP fault; MINOR makes its next access fault anyway."""


def no_huge_pages(addr: int, length: int) -> None:
    """MADV_NOHUGEPAGE on a guest mapping; a kernel without THP (EINVAL) has none to refuse."""
    try:
        madvise(addr, length, uapi.MADV_NOHUGEPAGE)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise


def pick_mode(kernel_features: int) -> str:
    """``rwp`` if the kernel has the RWP series, else ``uffd``; FailedPrecondition if neither works."""
    for mode in ("rwp", "uffd"):
        if kernel_features & MODE_FEATURES[mode] == MODE_FEATURES[mode]:
            return mode
    raise errors.FailedPrecondition(
        "userfaultfd lacks MISSING_SHMEM/MINOR_SHMEM: tiermem cannot manage this guest"
    )


def arm_uffd(uffd: Uffd, base: int, size: int, mode: str, kernel_features: int) -> tuple[ApiInfo, int]:
    """UFFDIO_API then UFFDIO_REGISTER for ``mode``; returns (api answer, negotiated features)."""
    need = MODE_FEATURES[mode]
    if kernel_features & need != need:
        missing = uapi.feature_names(need & ~kernel_features)
        raise errors.FailedPrecondition(f"mode {mode!r} needs {', '.join(missing)}, which this kernel lacks")
    features = need | (OPTIONAL_FEATURES & kernel_features)
    info = uffd.api(features)
    uffd.register(base, size, MODE_REGISTER[mode])
    return info, features


class GuestMemory:
    """A VM's guest RAM: a memfd, its guest mapping and the userfaultfd that traps it."""

    def __init__(
        self,
        vm_id: str,
        size: int,
        page_size: int,
        mode: str,
        memfd: int,
        mapping: Mapping,
        uffd: int,
        features: int,
    ) -> None:
        self.vm_id = vm_id
        self.size = size
        self.page_size = page_size
        self.mode = mode
        self.memfd = memfd
        self.uffd = uffd
        self.features = features
        """UFFDIO_API features negotiated on ``uffd``."""
        self._mapping = mapping
        self.base = mapping.addr
        """Host address of the guest mapping."""
        self.view = mapping.view()
        """The guest mapping: loads and stores through it fault like guest accesses."""
        self.attached = threading.Event()
        """Set while an agent serves this VM."""
        self.detached = threading.Event()
        """Set once the agent detached the VM (the range is unregistered)."""
        self.zaps = 0
        """Zap requests served."""
        self.incarnation = ""
        """The incarnation the agent issued to this VM at its first attach."""
        self.secret = ""
        """The reattach secret the agent handed this VMM: sent on every reattach, never logged."""
        self.fresh = False
        """Ask for a new incarnation even if an earlier VMM's evicted pages exist under this id (operator choice)."""
        self._closing = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._timeout = 10.0

    @classmethod
    def create(cls, vm_id: str, size: int, *, page_size: int = 4096, mode: str | None = None) -> GuestMemory:
        """memfd + MAP_SHARED guest mapping + uffd (UFFDIO_API, UFFDIO_REGISTER of the whole mapping)."""
        validate_id(vm_id, "vm id")
        if page_size != mmap_page_size():
            raise errors.InvalidArgument(f"page_size must be {mmap_page_size()}, got {page_size}")
        if size <= 0 or size % page_size:
            raise errors.InvalidArgument(f"size must be a positive multiple of {page_size}, got {size}")
        kernel_features, _ = uffd_api_features()
        mode = mode or pick_mode(kernel_features)
        if mode not in MODE_FEATURES:
            raise errors.InvalidArgument(f"mode must be 'uffd' or 'rwp', got {mode!r}")
        memfd = memfd_create(f"tiermem-{vm_id}", size)
        mapping: Mapping | None = None
        ufd = -1
        try:
            mapping = Mapping(memfd, size)
            no_huge_pages(mapping.addr, size)
            ufd = open_userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
            _, features = arm_uffd(Uffd(ufd), mapping.addr, size, mode, kernel_features)
        except BaseException:
            if ufd >= 0:
                os.close(ufd)
            if mapping is not None:
                mapping.close()
            os.close(memfd)
            raise
        return cls(vm_id, size, page_size, mode, memfd, mapping, ufd, features)

    def description(self, *, reattach: bool = False) -> dict[str, Any]:
        """The JSON description sent with the fds."""
        extra: dict[str, Any] = {}
        if reattach and self.secret:
            extra["secret"] = self.secret
        elif not reattach and self.fresh:
            extra["fresh"] = True
        return {
            **extra,
            "version": PROTOCOL_VERSION,
            "type": "reattach" if reattach else "attach",
            "vm_id": self.vm_id,
            "mode": self.mode,
            "vmm_pid": os.getpid(),
            "features": self.features,
            "regions": [
                {
                    "base_host_virt_addr": self.base,
                    "size": self.size,
                    "offset": 0,
                    "page_size": self.page_size,
                }
            ],
        }

    # --- handoff ---------------------------------------------------------------------------------
    def handoff(
        self, socket_path: str, *, timeout: float = 10.0, reconnect: bool = True, fresh: bool = False
    ) -> None:
        """Connect, send the fds and description, then serve the agent's requests in the background.

        Returns once the agent answered ``attached`` (``incarnation`` and ``secret`` are then set;
        every reconnect proves this VMM with the secret); raises the agent's error (InvalidArgument,
        AlreadyExists, FailedPrecondition when an earlier VMM's evicted pages exist under this id, ...)
        or Unavailable if no agent answered in time. ``fresh``: start a new incarnation instead (an
        operator's decision: the earlier VMM's pages are purged).
        """
        if self._thread is not None:
            raise errors.FailedPrecondition("handoff() was already called")
        self._timeout = timeout
        self.fresh = fresh
        sock, reader = self._connect(socket_path, timeout=timeout, reattach=False)
        self._sock = sock
        self._thread = threading.Thread(
            target=self._serve,
            args=(socket_path, sock, reader, reconnect),
            name=f"vmm-handoff-{self.vm_id}",
            daemon=True,
        )
        self._thread.start()

    def _connect(self, path: str, *, timeout: float, reattach: bool) -> tuple[socket.socket, FrameReader]:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                sock.connect(path)
                send_frame(sock, self.description(reattach=reattach), [self.uffd, self.memfd])
                reader = FrameReader(sock)
                while True:  # anything the agent sends before "attached" is served normally
                    msg = reader.read()
                    if msg is None:
                        raise ConnectionError("the agent closed the connection during the handshake")
                    if msg.get("type") == "attached":
                        self._remember(msg)
                        break
                    if msg.get("type") == "error":
                        raise _agent_error(msg)
                    self._dispatch(sock, msg)
                sock.settimeout(None)
                self.attached.set()
                return sock, reader
            except (FileNotFoundError, ConnectionRefusedError, ConnectionError, TimeoutError) as e:
                sock.close()
                if time.monotonic() >= deadline or self._closing.is_set():
                    raise errors.Unavailable(f"no agent answered on {path}: {e}") from None
                time.sleep(0.05)
            except BaseException:
                sock.close()
                raise

    def _remember(self, msg: dict[str, Any]) -> None:
        secret, incarnation = msg.get("secret"), msg.get("incarnation")
        if isinstance(secret, str) and secret:
            self.secret = secret
        if isinstance(incarnation, str) and incarnation:
            self.incarnation = incarnation

    def _serve(self, path: str, sock: socket.socket, reader: FrameReader, reconnect: bool) -> None:
        backoff = 0.05
        while not self._closing.is_set():
            try:
                while (msg := reader.read()) is not None:
                    self._dispatch(sock, msg)
                    if self.detached.is_set():
                        break
            except (OSError, ProtocolError) as e:
                if not self._closing.is_set():
                    log.warning("VM %s: handoff connection error: %s", self.vm_id, e)
            self.attached.clear()
            sock.close()
            if self.detached.is_set() or self._closing.is_set() or not reconnect:
                return
            log.info("VM %s: agent went away; reconnecting to %s", self.vm_id, path)
            while not self._closing.is_set():  # vCPUs on evicted pages wait in the kernel meanwhile
                try:
                    # the full handshake timeout: a busy agent restoring its index may take a while to answer
                    sock, reader = self._connect(path, timeout=self._timeout, reattach=True)
                    with self._lock:
                        self._sock = sock
                    backoff = 0.05
                    break
                except errors.TiermemError as e:
                    log.debug("VM %s: reattach failed: %s", self.vm_id, e)
                    self._closing.wait(backoff)
                    backoff = min(backoff * 2, 1.0)

    def _dispatch(self, sock: socket.socket, msg: dict[str, Any]) -> None:
        typ, rid = msg.get("type"), msg.get("id")
        if typ == "zap":
            try:
                self._zap(msg.get("ranges"))
                self.zaps += 1
                reply: dict[str, Any] = {"type": "ack", "id": rid}
            except (OSError, errors.InvalidArgument) as e:
                err = e.errno if isinstance(e, OSError) else errno.EINVAL
                reply = {"type": "nack", "id": rid, "error": str(e), "errno": err or errno.EIO}
            sock.sendall(encode_frame(reply))
        elif typ == "ping":
            sock.sendall(encode_frame({"type": "pong", "id": rid}))
        elif typ == "detach":
            self._detach()
        elif typ == "error":
            log.warning("VM %s: agent error: %s", self.vm_id, msg.get("error"))
        elif rid is not None:
            sock.sendall(
                encode_frame(
                    {
                        "type": "nack",
                        "id": rid,
                        "error": f"unknown request {typ!r}",
                        "errno": errno.EOPNOTSUPP,
                    }
                )
            )

    def _zap(self, ranges: Any) -> None:
        if not isinstance(ranges, list):
            raise errors.InvalidArgument("zap: ranges must be a list of [start, length]")
        checked: list[tuple[int, int]] = []
        for r in ranges:
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)):
                raise errors.InvalidArgument(f"zap: bad range {r!r}")
            start, length = r
            if length <= 0 or start % self.page_size or length % self.page_size:
                raise errors.InvalidArgument(f"zap: range {start:#x}+{length:#x} not page aligned")
            if start < self.base or start + length > self.base + self.size:
                raise errors.InvalidArgument(f"zap: range {start:#x}+{length:#x} outside guest memory")
            checked.append((start, length))
        for start, length in checked:
            # Drops the PTEs only; the memfd keeps the data, so the next touch is a MINOR fault.
            madvise(start, length, uapi.MADV_DONTNEED)

    def _detach(self) -> None:
        """The agent released this VM: unregister so nothing traps any more, stop reconnecting."""
        with contextlib.suppress(OSError):
            Uffd(self.uffd).unregister(self.base, self.size)
        self.detached.set()
        log.info("VM %s: detached by the agent", self.vm_id)

    # --- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Disconnect, close the uffd, unmap the guest mapping, close the memfd. ``view`` is dead after."""
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.sendall(encode_frame({"type": "bye"}))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        # The uffd first: with no reader left, nothing can block the munmap below.
        with contextlib.suppress(OSError):
            os.close(self.uffd)
        self._mapping.close()
        with contextlib.suppress(OSError):
            os.close(self.memfd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _agent_error(msg: dict[str, Any]) -> errors.TiermemError:
    text = f"agent refused the handoff: {msg.get('error', 'unknown error')}"
    cls: type[errors.TiermemError] = {
        "already_exists": errors.AlreadyExists,
        "failed_precondition": errors.FailedPrecondition,
        "unavailable": errors.Unavailable,
        "not_found": errors.NotFound,
        "internal": errors.TiermemError,
    }.get(str(msg.get("code")), errors.InvalidArgument)
    return cls(text)
