"""The VMM handoff protocol, agent side: listener, per-VMM connection, attach description.

Spec: ``docs/handoff.md``; wire format: :mod:`tiermem.handoff.wire`. A VMM
connects to the agent's Unix stream socket (0600, in a 0700 directory; the peer
pid comes from SO_PEERCRED) and sends one frame carrying ``[uffd, memfd]``
(SCM_RIGHTS) and a JSON description. The socket stays open as the control channel:
agent->VMM ``zap``, ``ping``, ``detach``; VMM->agent ``ack``/``nack``, ``pong``.
After an agent restart the VMM reconnects and sends the same fds again
(``type: reattach``).

Firecracker's own handshake is accepted too: one ``sendmsg`` with one fd (the
uffd) and an unframed JSON array of ``GuestRegionUffdMapping``; its guest memory
is private anonymous memory, so such a VM is served MISSING faults only.

Anything malformed (garbage, oversized, wrong fd count, wrong JSON types, unknown
version) gets a JSON error reply and a log line; received fds are closed; the
listener keeps serving everyone else. Each connection has its own thread, so a
slow or silent peer never blocks another VM's handshake.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from tiermem import errors
from tiermem.handoff.conn import HandoffConnection
from tiermem.handoff.messages import AttachedNotice
from tiermem.handoff.wire import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    ProtocolError,
    decode_body,
    decode_frame_length,
    encode_frame,
    parse_regions,
    peercred,
    recv_fds,
)
from tiermem.kernel import uapi
from tiermem.kernel.backend import TRACKED_REGISTER_MODE, Region
from tiermem.kernel.rwp import RwpBackend
from tiermem.kernel.uffd import MissingOnlyBackend, UffdBackend
from tiermem.kernel.uffd_base import RealBackend
from tiermem.kernel.uffd_ioctl import is_memfd, is_userfaultfd
from tiermem.model import validate_id

__all__ = ["HandoffAttach", "HandoffConnection", "HandoffListener", "ProtocolError"]

log = structlog.get_logger(__name__)

_ERROR_CODES: dict[type[Exception], str] = {
    errors.AlreadyExists: "already_exists",
    errors.InvalidArgument: "invalid_argument",
    errors.FailedPrecondition: "failed_precondition",
    errors.NotFound: "not_found",
    errors.Unavailable: "unavailable",
}

_HEX_RE = re.compile(r"[0-9a-f]+")


# --- what the agent receives -----------------------------------------------------------------------
@dataclass
class HandoffAttach:
    """One VMM handing over its guest memory."""

    vm_id: str
    mode: str
    """``uffd``, ``rwp`` or ``firecracker`` (MISSING-only over private anonymous memory)."""
    regions: tuple[Region, ...]
    uffd_fd: int
    memfd: int | None
    peer_pid: int
    peer_uid: int
    features: int
    """UFFDIO_API features the VMM negotiated (0 if it did not say: Firecracker)."""
    reattach: bool
    connection: HandoffConnection
    description: dict[str, Any] = field(default_factory=dict)
    secret: str = ""
    """The reattach secret the VMM presented (proves it is the VMM the agent gave it to)."""
    fresh: bool = False
    """The operator asked for a new incarnation even if evicted pages of an earlier one exist."""
    incarnation: str = ""
    """Set by the attach callback: the VM's incarnation, sent in the ``attached`` reply."""
    issued_secret: str = ""
    """Set by the attach callback: the reattach secret handed to this VMM in the ``attached`` reply."""
    _taken: bool = False

    @property
    def tracking(self) -> bool:
        """False for Firecracker's handshake: MISSING faults only, no cycles."""
        return self.mode != "firecracker"

    @property
    def fds(self) -> tuple[int, ...]:
        """The received fds (uffd first)."""
        return (self.uffd_fd,) if self.memfd is None else (self.uffd_fd, self.memfd)

    def take_fds(self) -> tuple[int, int | None]:
        """Take ownership of the fds (the listener no longer closes them on failure)."""
        self._taken = True
        return self.uffd_fd, self.memfd

    def close_fds(self) -> None:
        """Close the fds unless someone took them."""
        if not self._taken:
            self._taken = True
            for fd in self.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def make_backend(self, *, arm: bool = True) -> RealBackend:
        """The kernel backend for this VM; it owns the fds. ``arm`` negotiates and registers
        the RWP workflow (``api(RWP|RWP_ASYNC)``, ``register(MISSING|MINOR|RWP)``) like the sim."""
        backend: RealBackend
        if self.mode == "firecracker":
            backend = MissingOnlyBackend(self.uffd_fd, self.regions, self.connection, vmm_pid=self.peer_pid)
        elif self.mode == "uffd":
            assert self.memfd is not None
            backend = UffdBackend(
                self.uffd_fd,
                self.memfd,
                self.regions,
                self.connection,
                vmm_pid=self.peer_pid,
                features=self.features,
            )
        else:
            assert self.memfd is not None
            backend = RwpBackend(
                self.uffd_fd,
                self.memfd,
                self.regions,
                self.connection,
                vmm_pid=self.peer_pid,
                features=self.features,
            )
        self._taken = True
        if arm and backend.tracking:
            try:
                backend.api(uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC)
                backend.register(backend.base, backend.size, TRACKED_REGISTER_MODE)
                if self.mode == "rwp":  # a dead agent may have left the shared uffd context frozen (sync)
                    backend.set_mode(enable=uapi.UFFD_FEATURE_RWP_ASYNC)
            except BaseException:
                backend.close()
                raise
        return backend


def _code_of(e: BaseException) -> str:
    if isinstance(e, ProtocolError):
        return e.code
    return next((c for t, c in _ERROR_CODES.items() if isinstance(e, t)), "internal")


class HandoffListener:
    """The agent's handoff socket: accepts VMMs and calls ``on_attach`` for each valid handshake.

    ``on_attach`` runs on the connection's own thread; if it raises, the VMM gets an
    error reply and the fds are closed (unless it took them, e.g. ``make_backend``).
    Otherwise the VMM gets ``attached`` and the thread serves the control channel
    until the VMM goes away.
    """

    def __init__(
        self,
        path: str,
        on_attach: Callable[[HandoffAttach], None],
        *,
        handshake_timeout: float = 5.0,
        max_connections: int = 1024,
        firecracker_vm_id: Callable[[int], str] | None = None,
    ) -> None:
        if len(os.fsencode(os.path.abspath(path))) >= 108:
            raise errors.ConfigurationError(
                f"handoff socket path is too long for AF_UNIX (< 108 bytes): {path}"
            )
        self.path = os.path.abspath(path)
        self._on_attach = on_attach
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self._fc_vm_id = firecracker_vm_id or (lambda pid: f"fc-{pid}")
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._active = 0
        self._conns: set[HandoffConnection] = set()
        self._ino = 0
        self.rejected = 0
        """Handshakes rejected so far."""

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> HandoffListener:
        """Create the socket (0600 in a 0700 directory) and start accepting."""
        d = os.path.dirname(self.path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        if os.stat(d).st_mode & 0o077:
            log.warning(
                "handoff socket directory is accessible to group/others; the socket itself is 0600", dir=d
            )
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise errors.FailedPrecondition(f"{self.path} exists and is not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(self.path)
                except OSError:
                    os.unlink(self.path)  # stale socket of a dead agent
                else:
                    raise errors.FailedPrecondition(f"another process is listening on {self.path}")
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)  # atomic: the socket is never reachable with wider permissions
            self._ino = os.stat(self.path).st_ino
            sock.listen(128)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="handoff-accept", daemon=True)
        self._thread.start()
        log.info("handoff listener", path=self.path)
        return self

    def stop(self, *, close_connections: bool = True) -> None:
        """Stop accepting (and close the VMM connections unless told not to)."""
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        if close_connections:
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                c.close()

    @property
    def connections(self) -> list[HandoffConnection]:
        """Open VMM connections."""
        with self._lock:
            return [c for c in self._conns if not c.closed]

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)
                continue
            with self._lock:
                full = self._active >= self.max_connections
                if not full:
                    self._active += 1
            if full:
                self._reject(conn, [], ProtocolError("too many connections", "unavailable"), fc=False)
                conn.close()
                continue
            threading.Thread(target=self._connection, args=(conn,), name="handoff-conn", daemon=True).start()

    # --- one connection ---------------------------------------------------------------------------
    def _connection(self, sock: socket.socket) -> None:
        try:
            self._handle(sock)
        except Exception:
            log.exception("handoff: unexpected error on a connection")
        finally:
            with self._lock:
                self._active -= 1

    def _handle(self, sock: socket.socket) -> None:
        fds: list[int] = []
        fc = False
        try:
            pid, uid, _ = peercred(sock)
            # One deadline for the whole handshake: a per-recv timeout alone lets a peer that
            # trickles a byte now and then hold the connection (and a handshake slot) for ever.
            deadline = time.monotonic() + self.handshake_timeout
            sock.settimeout(self.handshake_timeout)
            try:
                desc, fds, fc, pending = self._read_handshake(sock, deadline)
                attach = (
                    self._fc_attach(desc, fds, pid, uid, sock)
                    if fc
                    else self._attach(desc, fds, pid, uid, sock)
                )
                attach.connection._reader.buf += pending
            except TimeoutError:
                raise self._timed_out() from None
        except ProtocolError as e:
            self._reject(sock, fds, e, fc=fc or e.firecracker)
            sock.close()
            return
        except OSError as e:
            log.info("handoff: connection failed during the handshake", error=str(e))
            _close_all(fds)
            sock.close()
            return
        try:
            self._on_attach(attach)
        except Exception as e:
            log.warning("handoff: attach refused", vm=attach.vm_id, error=str(e))
            self.rejected += 1
            attach.close_fds()
            with contextlib.suppress(OSError):
                _reply_error(sock, str(e), _code_of(e), fc=fc)
            sock.close()
            return
        conn = attach.connection
        with self._lock:
            self._conns.add(conn)
        try:
            sock.settimeout(None)
            if not fc:
                notice: AttachedNotice = {
                    "type": "attached",
                    "version": PROTOCOL_VERSION,
                    "vm_id": attach.vm_id,
                }
                if attach.incarnation:
                    notice["incarnation"] = attach.incarnation
                    notice["secret"] = attach.issued_secret
                conn._send(notice)
            log.info(
                "handoff: VM attached", vm=attach.vm_id, mode=attach.mode, pid=pid, reattach=attach.reattach
            )
            conn.serve()
        except OSError as e:
            log.info("handoff: VM connection failed", vm=attach.vm_id, error=str(e))
            conn._finish()
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _reject(self, sock: socket.socket, fds: list[int], e: ProtocolError, *, fc: bool) -> None:
        self.rejected += 1
        _close_all(fds)
        fds.clear()
        log.warning("handoff: rejected a handshake", error=str(e))
        with contextlib.suppress(OSError):
            _reply_error(sock, str(e), e.code, fc=fc)

    def _timed_out(self) -> ProtocolError:
        return ProtocolError(f"handshake timed out: not completed within {self.handshake_timeout:g} s")

    def _read_handshake(self, sock: socket.socket, deadline: float) -> tuple[Any, list[int], bool, bytes]:
        """(description, fds, firecracker format, bytes after the handshake); fds grow as they arrive.

        ``deadline`` (monotonic) bounds the whole handshake, however the peer paces its bytes.
        """
        fds: list[int] = []
        buf = bytearray()

        def more(timeout: float | None = None) -> bool:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out()
            if timeout is not None:
                r, _, _ = select.select([sock], [], [], min(timeout, left))
                if not r:
                    if timeout > left:
                        raise self._timed_out()
                    return False
            sock.settimeout(left)
            data, got, trunc = recv_fds(sock, 4 + MAX_MESSAGE - len(buf) + 1)
            fds.extend(got)
            if trunc:
                raise ProtocolError("too many file descriptors in the handshake")
            if not data:
                raise ProtocolError("connection closed inside the handshake")
            buf.extend(data)
            return True

        try:
            more()
            first = bytes(buf).lstrip()[:1]
            if first == b"[":  # Firecracker: one unframed JSON array, sent with one sendmsg
                try:
                    while True:
                        try:
                            return json.loads(bytes(buf).decode()), fds, True, b""
                        except (UnicodeDecodeError, json.JSONDecodeError) as e:
                            if len(buf) > MAX_MESSAGE:
                                raise ProtocolError(f"handshake larger than {MAX_MESSAGE} bytes") from None
                            if not more(timeout=0.2):
                                raise ProtocolError(
                                    f"malformed JSON in Firecracker's handshake: {e}"
                                ) from None
                except ProtocolError as pe:
                    pe.firecracker = True
                    raise
            if first == b"{":
                raise ProtocolError("JSON without the 4-byte big-endian length prefix")
            while len(buf) < 4:
                more()
            n = decode_frame_length(bytes(buf[:4]))
            while len(buf) < 4 + n:
                more()
            return decode_body(bytes(buf[4 : 4 + n])), fds, False, bytes(buf[4 + n :])
        except BaseException:
            # the caller only learns about fds through the return value: close them here
            _close_all(fds)
            raise

    def _fc_attach(self, desc: Any, fds: list[int], pid: int, uid: int, sock: socket.socket) -> HandoffAttach:
        try:
            regions = parse_regions(desc, memfd_backed=False)
            if len(fds) != 1:
                raise ProtocolError(
                    f"Firecracker's handshake carries exactly 1 fd (the uffd), got {len(fds)}"
                )
            if not is_userfaultfd(fds[0]):
                raise ProtocolError("the fd is not a userfaultfd")
            vm_id = validate_id(self._fc_vm_id(pid), "vm id")
        except BaseException:
            _close_all(fds)
            raise
        conn = HandoffConnection(sock, vm_id=vm_id, peer_pid=pid, firecracker=True)
        return HandoffAttach(
            vm_id=vm_id,
            mode="firecracker",
            regions=regions,
            uffd_fd=fds[0],
            memfd=None,
            peer_pid=pid,
            peer_uid=uid,
            features=0,
            reattach=False,
            connection=conn,
            description={"regions": desc},
        )

    def _attach(self, desc: Any, fds: list[int], pid: int, uid: int, sock: socket.socket) -> HandoffAttach:
        try:
            if not isinstance(desc, dict):
                raise ProtocolError("the handshake must be a JSON object (or Firecracker's JSON array)")
            version = desc.get("version")
            if version != PROTOCOL_VERSION or isinstance(version, bool):
                raise ProtocolError(
                    f"unsupported protocol version {version!r}; this agent speaks {PROTOCOL_VERSION}",
                    "unsupported_version",
                )
            typ = desc.get("type", "attach")
            if typ not in ("attach", "reattach"):
                raise ProtocolError(f"the first message must be attach or reattach, got {typ!r}")
            raw_id = desc.get("vm_id")
            try:
                vm_id = validate_id(raw_id, "vm_id") if isinstance(raw_id, str) else ""
            except errors.InvalidArgument as e:
                raise ProtocolError(str(e)) from None
            if not vm_id:
                raise ProtocolError(f"vm_id must be a string, got {raw_id!r}")
            mode = desc.get("mode")
            if mode not in ("uffd", "rwp"):
                raise ProtocolError(f"mode must be 'uffd' or 'rwp', got {mode!r}")
            regions = parse_regions(desc.get("regions"), memfd_backed=True)
            features = desc.get("features", 0)
            if not isinstance(features, int) or isinstance(features, bool) or not 0 <= features < 1 << 64:
                raise ProtocolError(f"features must be an unsigned 64-bit integer, got {features!r}")
            secret = desc.get("secret", "")
            if not isinstance(secret, str) or len(secret) > 128 or (secret and not _HEX_RE.fullmatch(secret)):
                raise ProtocolError("secret must be the hex string the agent sent in its attached reply")
            fresh = desc.get("fresh", False)
            if not isinstance(fresh, bool):
                raise ProtocolError(f"fresh must be true or false, got {fresh!r}")
            if fresh and typ == "reattach":
                raise ProtocolError("fresh is for attach, not reattach")
            vmm_pid = desc.get("vmm_pid")
            if vmm_pid is not None and (not isinstance(vmm_pid, int) or isinstance(vmm_pid, bool)):
                raise ProtocolError(f"vmm_pid must be an integer, got {vmm_pid!r}")
            if vmm_pid is not None and vmm_pid != pid:
                log.warning(
                    "handoff: vmm_pid differs from SO_PEERCRED (pid namespace?); using SO_PEERCRED",
                    vm=vm_id,
                    vmm_pid=vmm_pid,
                    peer_pid=pid,
                )
            if len(fds) != 2:
                raise ProtocolError(f"the attach message carries exactly 2 fds [uffd, memfd], got {len(fds)}")
            if not is_userfaultfd(fds[0]):
                raise ProtocolError("fd 0 is not a userfaultfd")
            if not is_memfd(fds[1]):
                raise ProtocolError("fd 1 is not a memfd")
            span = max(r.offset + r.size for r in regions)
            if os.fstat(fds[1]).st_size < span:
                raise ProtocolError(f"the memfd is smaller than the regions ({span} bytes)")
        except BaseException:
            _close_all(fds)
            raise
        conn = HandoffConnection(sock, vm_id=vm_id, peer_pid=pid, firecracker=False)
        return HandoffAttach(
            vm_id=vm_id,
            mode=mode,
            regions=regions,
            uffd_fd=fds[0],
            memfd=fds[1],
            peer_pid=pid,
            peer_uid=uid,
            features=features,
            reattach=typ == "reattach",
            connection=conn,
            description=desc,
            secret=secret,
            fresh=fresh,
        )


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _reply_error(sock: socket.socket, message: str, code: str, *, fc: bool) -> None:
    msg = {"type": "error", "version": PROTOCOL_VERSION, "error": message, "code": code}
    if fc:  # Firecracker never reads; a human with socat does: plain JSON line
        sock.sendall((json.dumps(msg) + "\n").encode())
    else:
        sock.sendall(encode_frame(msg))
