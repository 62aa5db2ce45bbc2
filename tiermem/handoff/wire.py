"""Wire format of the VMM handoff protocol: framing, fd passing and region descriptions.

Shared by the agent's listener (:mod:`tiermem.handoff.listener`) and the VMM client
(:mod:`tiermem.handoff.client`). A frame is a 4-byte big-endian length followed by
that many bytes of UTF-8 JSON (one object), at most :data:`MAX_MESSAGE` bytes.
"""

from __future__ import annotations

import array
import json
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from tiermem import errors
from tiermem.kernel.backend import Region
from tiermem.kernel.uffd_base import validate_regions

__all__ = [
    "MAX_FDS",
    "MAX_MESSAGE",
    "PROTOCOL_VERSION",
    "FrameReader",
    "ProtocolError",
    "decode_body",
    "decode_frame_length",
    "encode_frame",
    "parse_firecracker_regions",
    "parse_regions",
    "peercred",
    "recv_fds",
    "recv_frame",
    "send_frame",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024
"""Largest JSON body accepted, bytes."""
MAX_FDS = 8
"""Room for this many fds when receiving, so a wrong count is detected (and closed)."""
_PAGE_SIZES = (4096, 2 * 1024 * 1024, 1024 * 1024 * 1024)


class ProtocolError(errors.InvalidArgument):
    """A peer broke the handoff protocol; ``code`` is sent back in the error reply."""

    def __init__(self, message: str, code: str = "invalid_argument") -> None:
        super().__init__(message)
        self.code = code
        self.firecracker = False
        """Raised while reading Firecracker's (unframed) handshake: reply with a plain JSON line."""


# --- framing ----------------------------------------------------------------------------------------
def encode_frame(msg: Mapping[str, Any]) -> bytes:
    """4-byte big-endian length + compact JSON."""
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return struct.pack(">I", len(body)) + body


def decode_frame_length(prefix: bytes) -> int:
    """Body length from a 4-byte prefix; ProtocolError if empty or too large."""
    (n,) = struct.unpack(">I", prefix)
    if n == 0 or n > MAX_MESSAGE:
        raise ProtocolError(f"message length {n} is outside 1..{MAX_MESSAGE}")
    return int(n)


def decode_body(body: bytes) -> Any:
    try:
        return json.loads(body.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"malformed JSON: {e}") from None


def recv_fds(sock: socket.socket, size: int, max_fds: int = MAX_FDS) -> tuple[bytes, list[int], bool]:
    """recvmsg with room for ``max_fds`` fds: (data, fds, ancillary data truncated)."""
    data, anc, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(max_fds * 4))
    fds: list[int] = []
    for level, typ, payload in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return data, fds, bool(flags & socket.MSG_CTRUNC)


def send_frame(sock: socket.socket, msg: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one framed message, with ``fds`` as SCM_RIGHTS on its first byte."""
    data = encode_frame(msg)
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


class FrameReader:
    """Framed reads on a stream socket, with a carry-over buffer."""

    def __init__(self, sock: socket.socket, pending: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(pending)

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(n - len(self.buf), 4096))
            if not chunk:
                return False
            self.buf += chunk
        return True

    def read(self) -> dict[str, Any] | None:
        """Next framed JSON object, or None at EOF; ProtocolError if malformed."""
        if not self._fill(4):
            if self.buf:
                raise ProtocolError("connection closed inside a message")
            return None
        n = decode_frame_length(bytes(self.buf[:4]))
        if not self._fill(4 + n):
            raise ProtocolError("connection closed inside a message")
        body = bytes(self.buf[4 : 4 + n])
        del self.buf[: 4 + n]
        msg = decode_body(body)
        if not isinstance(msg, dict):
            raise ProtocolError("a message must be a JSON object")
        return msg


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """Read one framed message from ``sock`` (no carry-over: for request/response use)."""
    return FrameReader(sock).read()


# --- descriptions -------------------------------------------------------------------------------------
def _int(d: dict[str, Any], key: str, *, default: int | None = None, minimum: int = 0) -> int:
    v = d.get(key, default)
    if v is None:
        raise ProtocolError(f"missing field {key!r}")
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum or v >= 1 << 64:
        raise ProtocolError(f"field {key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _page_size(d: dict[str, Any]) -> int:
    if "page_size" in d:
        ps = _int(d, "page_size", minimum=1)
    elif "page_size_kib" in d:
        # Deprecated field: in KiB in older Firecracker releases, in bytes in newer ones.
        v = _int(d, "page_size_kib", minimum=1)
        ps = v if v in _PAGE_SIZES else v * 1024
    else:
        ps = 4096  # the oldest releases sent no page size: 4 KiB pages
    if ps not in _PAGE_SIZES:
        raise ProtocolError(f"page size {ps} is not 4 KiB, 2 MiB or 1 GiB")
    return ps


def _region(d: Any) -> Region:
    if not isinstance(d, dict):
        raise ProtocolError(f"a region must be a JSON object, got {type(d).__name__}")
    return Region(
        base_host_virt_addr=_int(d, "base_host_virt_addr"),
        size=_int(d, "size", minimum=1),
        offset=_int(d, "offset", default=0),
        page_size=_page_size(d),
    )


def parse_regions(value: Any, *, memfd_backed: bool) -> tuple[Region, ...]:
    """Regions from JSON (unknown fields ignored), validated for the backend."""
    if not isinstance(value, list) or not value:
        raise ProtocolError("regions must be a non-empty JSON array")
    if len(value) > 256:
        raise ProtocolError("more than 256 regions")
    regions = tuple(_region(r) for r in value)
    try:
        validate_regions(regions, memfd_backed=memfd_backed)
    except errors.InvalidArgument as e:
        raise ProtocolError(str(e)) from None
    return regions


def parse_firecracker_regions(data: bytes) -> tuple[Region, ...]:
    """Firecracker's ``Vec<GuestRegionUffdMapping>`` as serde_json writes it."""
    return parse_regions(decode_body(data), memfd_backed=False)


def peercred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid
