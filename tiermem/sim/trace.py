"""Access traces: CSV ``tick,page,op`` (optionally gzip), parsed with numpy, replayed as a workload.

Format: a header line ``tick,page,op``, then one access per line. ``tick`` is a
non-decreasing integer, ``page`` a 0-based page index, ``op`` is ``r`` or ``w``;
lines end with LF or CRLF. The guest has ``1 + max(page)`` pages unless a size is
given; the trace covers ticks ``0 .. max(tick)`` (a tick with no line has no
access). A gzip file is recognised by its magic bytes, whatever its name.

Parsing never loops in Python per line: the raw bytes are split with numpy
(newline and comma positions), digits are accumulated column by column, and the
first malformed line is reported as ``InvalidArgument("trace FILE line N: ...")``.

Untrusted input: errors name the file and the line but never echo its contents
(a trace path may point at a secret), reads and gzip output are capped at
``max_bytes`` (a gzip bomb or ``/dev/zero`` cannot exhaust memory), and
:class:`TraceDir` confines the files an agent reads to one directory.
"""

from __future__ import annotations

import gzip
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiermem.errors import FailedPrecondition, InvalidArgument

__all__ = ["DEFAULT_MAX_BYTES", "HEADER", "Trace", "TraceDir", "load_trace", "parse_trace", "write_trace"]

HEADER = b"tick,page,op"
DEFAULT_MAX_BYTES = 1 << 30
"""Default cap on a trace's size, stored and decompressed."""
_MAX_DIGITS = 18  # < 2**63 without overflow checks
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, eq=False)
class Trace:
    """A parsed trace: parallel arrays, sorted by tick."""

    ticks: np.ndarray
    """int64, non-decreasing."""
    pages: np.ndarray
    """int64 page indices."""
    writes: np.ndarray
    """bool, True for ``w``."""
    n_pages: int
    """Guest size in pages."""
    n_ticks: int
    """1 + the largest tick (0 for an empty trace)."""
    name: str = "<trace>"

    def __len__(self) -> int:
        return len(self.ticks)

    def by_tick(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(tick, pages, writes) for every tick 0 .. n_ticks-1, empty slices included (views, no copies)."""
        if not len(self.ticks):
            yield from ((t, self.pages[:0], self.writes[:0]) for t in range(self.n_ticks))
            return
        change = np.flatnonzero(self.ticks[1:] != self.ticks[:-1]) + 1
        bounds = np.concatenate([[0], change, [len(self.ticks)]]).tolist()
        present = self.ticks[bounds[:-1]].tolist()
        j = 0
        for t in range(self.n_ticks):
            if j < len(present) and present[j] == t:
                a, b = bounds[j], bounds[j + 1]
                j += 1
                yield t, self.pages[a:b], self.writes[a:b]
            else:
                yield t, self.pages[:0], self.writes[:0]


def _fail(name: str, line: int, what: str) -> InvalidArgument:
    return InvalidArgument(f"trace {name} line {line}: {what}")


_ZEROS = np.uint64(0x3030_3030_3030_3030)
_HIGH = np.uint64(0x8080_8080_8080_8080)
_ADD76 = np.uint64(0x7676_7676_7676_7676)
_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_CHUNK = 1 << 17  # fields per step: keeps the u64 temporaries in cache


def _swar8(x: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Parse, in place, up to 8 ASCII digits held in the high ``length`` bytes of little-endian
    u64 words (the bytes before the field are ignored); returns the bad mask."""
    shift = (8 - np.minimum(length, 8)).astype(np.uint64)
    np.left_shift(shift, np.uint64(3), out=shift)
    keep = np.left_shift(_ONES, shift)  # a shift by 64 (empty field) gives 0
    np.bitwise_xor(x, _ZEROS, out=x)  # '0'..'9' -> 0..9, anything else -> > 9
    np.bitwise_and(x, keep, out=x)  # bytes before the field -> 0
    bad: np.ndarray = np.bitwise_and(np.bitwise_or(x + _ADD76, x), _HIGH) != 0  # a byte > 9
    for mul, sh, mask in (
        (10, 8, 0x00FF_00FF_00FF_00FF),
        (100, 16, 0x0000_FFFF_0000_FFFF),
        (10000, 32, 0xFFFF_FFFF),
    ):
        t = np.right_shift(x, np.uint64(sh))
        np.multiply(x, np.uint64(mul), out=x)
        np.add(x, t, out=x)
        np.bitwise_and(x, np.uint64(mask), out=x)
    return bad


def _parse_uint(words: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decimal fields [start, end) -> (values, bad), 8 digits per u64 step (SWAR), no per-line loop.

    ``words[i]`` is the unaligned little-endian u64 holding the 8 bytes before
    byte ``i`` of the text, so ``words[end]`` ends with the field.
    """
    length = end - start
    value = np.empty(len(start), dtype=np.uint64)
    bad = np.empty(len(start), dtype=bool)
    for a in range(0, len(start), _CHUNK):
        b = a + _CHUNK
        x = words[end[a:b]]
        bad[a:b] = _swar8(x, length[a:b])
        value[a:b] = x
    bad |= (length <= 0) | (length > _MAX_DIGITS)
    for w in (1, 2):  # rare longer fields: the next 8 digits to the left, twice (18 digits max)
        if (long := np.flatnonzero((length > 8 * w) & (length <= _MAX_DIGITS))).size:
            hi = words[end[long] - 8 * w]
            bad[long] |= _swar8(hi, length[long] - 8 * w)
            value[long] += hi * np.uint64(10 ** (8 * w))
    return value.astype(np.int64), bad


def _too_big(name: str, limit: int, what: str) -> InvalidArgument:
    return InvalidArgument(f"trace {name}: {what} more than {limit} bytes (the trace size limit)")


def _gunzip(raw: bytes, name: str, limit: int) -> bytes:
    """Decompress every gzip member (zlib directly: faster than gzip.decompress), at most ``limit`` bytes.

    zlib's ``max_length`` stops inflating one byte past the limit, so a bomb costs
    ``limit`` bytes of memory, never its expanded size.
    """
    out = bytearray()
    try:
        while raw:
            d = zlib.decompressobj(wbits=31)
            out += d.decompress(raw, limit - len(out) + 1)
            if len(out) > limit:
                raise _too_big(name, limit, "decompresses to")
            if not d.eof:
                raise InvalidArgument(f"trace {name}: bad gzip data: truncated")
            raw = d.unused_data.lstrip(b"\0")  # members may be padded with zeros
    except zlib.error as e:
        raise InvalidArgument(f"trace {name}: bad gzip data: {e}") from None
    return bytes(out)


def parse_trace(
    raw: bytes, name: str = "<trace>", n_pages: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> Trace:
    """Parse the bytes of a trace (gzip or plain; at most ``max_bytes`` once decompressed)."""
    if raw[:2] == _GZIP_MAGIC:
        raw = _gunzip(raw, name, max_bytes)
    elif len(raw) > max_bytes:
        raise _too_big(name, max_bytes, "holds")
    nl = raw.find(b"\n")
    header = raw[: nl if nl >= 0 else len(raw)].rstrip(b"\r")
    if header.startswith(b"\xef\xbb\xbf"):
        header = header[3:]
    if header != HEADER:
        # never echo what was read: the "trace" may be a secret file (trace:/etc/shadow)
        raise _fail(name, 1, "expected the header 'tick,page,op'")
    body_at = nl + 1 if nl >= 0 else len(raw)
    buf = np.frombuffer(raw, dtype=np.uint8)[body_at:]
    # words[i] = the 8 bytes before body byte i; the header (>= 13 bytes) pads the first line.
    words = np.ndarray(shape=(len(buf) + 1,), dtype="<u8", buffer=raw, offset=body_at - 8, strides=(1,))
    ends = np.flatnonzero(buf == 10)
    if len(buf) and buf[-1] != 10:
        ends = np.append(ends, len(buf))  # last line without a newline
    starts = np.empty_like(ends)
    if len(ends):
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13)
        ends = ends - cr
    lines = len(ends)
    # Exactly two commas per line: commas 2i and 2i+1 inside line i for every i, and no others.
    commas = np.flatnonzero(buf == 44)
    c1, c2 = commas[0::2], commas[1::2]
    if len(commas) != 2 * lines or (lines and ((c1 < starts) | (c2 >= ends)).any()):
        per_line = np.bincount(np.searchsorted(starts, commas, side="right") - 1, minlength=lines)
        i = int(np.flatnonzero(per_line != 2)[0])
        what = (
            "empty line"
            if ends[i] == starts[i]
            else f"expected 3 comma-separated fields, got {per_line[i] + 1}"
        )
        raise _fail(name, i + 2, what)
    ticks, bad_t = _parse_uint(words, starts, c1)
    pages, bad_p = _parse_uint(words, c1 + 1, c2)
    op_ok = ends - c2 == 2
    op = buf[np.minimum(c2 + 1, max(len(buf) - 1, 0))] if lines else np.zeros(0, dtype=np.uint8)
    op_ok &= (op == ord("r")) | (op == ord("w"))
    problems = [
        (bad_t, "tick must be a non-negative integer of at most 18 digits"),
        (bad_p, "page must be a non-negative integer of at most 18 digits"),
        (~op_ok, "op must be 'r' or 'w'"),
    ]
    if lines > 1:
        dec = np.zeros(lines, dtype=bool)
        dec[1:] = ticks[1:] < ticks[:-1]
        problems.append((dec & ~bad_t & ~np.roll(bad_t, 1), "tick decreases (ticks must be non-decreasing)"))
    if n_pages is not None:
        if n_pages <= 0:
            raise InvalidArgument(f"trace {name}: guest size must be > 0 pages, got {n_pages}")
        problems.append((~bad_p & (pages >= n_pages), f"page out of range (the guest has {n_pages} pages)"))
    first = [(int(np.argmax(mask)), what) for mask, what in problems if mask.any()]
    if first:
        i, what = min(first)
        raise _fail(name, i + 2, what)
    if n_pages is None:
        if not lines:
            raise InvalidArgument(f"trace {name}: no accesses, so the guest size must be given")
        n_pages = int(pages.max()) + 1
    return Trace(ticks, pages, op == ord("w"), n_pages, int(ticks[-1]) + 1 if lines else 0, name)


def _read_capped(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refusing more than ``limit`` (never reads past limit + 1).

    O_NONBLOCK: opening a FIFO must not hang; O_NOFOLLOW: the last component is
    not a symlink (TraceDir resolves the others). Devices such as /dev/zero are
    refused before any read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidArgument(f"trace {path}: cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"trace {path}: not a regular file")
        if st.st_size > limit:
            raise _too_big(str(path), limit, "holds")
        chunks, got = [], 0
        while got <= limit:
            try:
                chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            except OSError as e:
                raise InvalidArgument(f"trace {path}: cannot read: {e.strerror or e}") from None
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    if got > limit:  # the file grew while being read
        raise _too_big(str(path), limit, "holds")
    return b"".join(chunks)


def load_trace(
    path: str | os.PathLike[str], n_pages: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> Trace:
    """Read and parse a trace file (gzip detected by its magic bytes), at most ``max_bytes``."""
    p = Path(path)
    return parse_trace(_read_capped(p, max_bytes), str(p), n_pages, max_bytes)


@dataclass(frozen=True)
class TraceDir:
    """Where a service may read traces from: one directory (None: traces are off), with a size cap.

    The node agent reads a sim VM's ``trace:PATH`` through this, so an admin's
    request can name only files under ``root`` (after resolving symlinks and
    ``..``), never ``/etc/shadow`` or ``/dev/zero``.
    """

    root: str | None
    max_bytes: int = DEFAULT_MAX_BYTES

    def load(self, path: str, n_pages: int | None = None) -> Trace:
        """Read and parse ``path`` (relative to ``root``, or absolute inside it)."""
        if not self.root:
            raise FailedPrecondition("trace workloads are off on this node (the agent has no trace_dir)")
        root = os.path.realpath(self.root)
        real = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([real, root]) != root or real == root:
            raise InvalidArgument(f"trace {path!r}: only files inside the agent's trace_dir may be replayed")
        return load_trace(real, n_pages, self.max_bytes)


def _digits(values: np.ndarray) -> np.ndarray:
    n = np.ones(len(values), dtype=np.int64)
    top = int(values.max()) if len(values) else 0
    for k in range(1, len(str(top))):
        n += values >= 10**k
    return n


def _decimal_digits(values: np.ndarray) -> Iterator[np.ndarray]:
    """Digits of ``values`` from the least significant, as uint8 arrays (exact float path below 2**49)."""
    if len(values) and int(values.max()) >= 1 << 49:
        v = values.copy()
        while True:
            yield (v % 10).astype(np.uint8)
            v //= 10
    f = values.astype(np.float64)
    while True:  # floor(v / 10) is exact for v < 2**49, and so is v - 10 * q
        q = np.floor(f / 10.0)
        yield (f - q * 10.0).astype(np.uint8)
        f = q


def write_trace(
    path: str | os.PathLike[str],
    ticks: np.ndarray,
    pages: np.ndarray,
    writes: np.ndarray,
    *,
    compress: bool | None = None,
) -> Path:
    """Write a trace (vectorised formatting); gzip when ``compress`` or the name ends in ``.gz``."""
    t = np.asarray(ticks, dtype=np.int64)
    p = np.asarray(pages, dtype=np.int64)
    w = np.asarray(writes, dtype=bool)
    if not len(t) == len(p) == len(w):
        raise InvalidArgument("ticks, pages and writes must have the same length")
    if len(t) and (t.min() < 0 or p.min() < 0):
        raise InvalidArgument("ticks and pages must be >= 0")
    if len(t) > 1 and (np.diff(t) < 0).any():
        raise InvalidArgument("ticks must be non-decreasing")
    nt, np_ = _digits(t), _digits(p)
    width = nt + np_ + 4  # two commas, op, newline
    off = np.zeros(len(t) + 1, dtype=np.int64)
    np.cumsum(width, out=off[1:])
    out = np.empty(int(off[-1]) + 1, dtype=np.uint8)  # + a scratch byte for absent digits
    scratch = len(out) - 1
    for values, start, nd in ((t, off[:-1], nt), (p, off[:-1] + nt + 1, np_)):
        last = start + nd - 1
        digits = _decimal_digits(values)
        for k in range(int(nd.max()) if len(nd) else 0):
            out[np.where(nd > k, last - k, scratch)] = next(digits) + 48
    out[off[:-1] + nt] = ord(",")
    out[off[:-1] + nt + np_ + 1] = ord(",")
    out[off[:-1] + nt + np_ + 2] = np.where(w, ord("w"), ord("r")).astype(np.uint8)
    out[off[1:] - 1] = ord("\n")
    data = HEADER + b"\n" + out[:-1].tobytes()
    dst = Path(path)
    if compress if compress is not None else dst.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)
    dst.write_bytes(data)
    return dst
