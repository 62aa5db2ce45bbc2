"""The segment and tombstone blob formats (shared by the local and S3 stores).

A segment holds the payloads of one put batch (or of one compaction)::

    payload_0 .. payload_n-1 | index (n x 44 B) | footer (32 B)

- index entry ``<QQQIIQB3x``: page, generation, seq, offset, length, xxh3-64 of
  the raw page, codec. ``seq`` is the time of the *original* put; compaction
  keeps it, so when two segments hold the same (page, generation) the newer
  write wins (ties: the newer segment, i.e. the compacted copy).
- footer ``<8sIIQQ``: magic ``TMSEG001``, entry count, format version, index
  offset, xxh3-64 of the index. One ranged read of a segment's tail gives its
  whole index, so a restarted process can rebuild its map.

A tombstone blob lists deletes in segments that stay::

    header <8sIIQ> (magic TMDEL001, count, version, xxh3-64 of the body) | n x <22sQQ> (segment, page, generation)

Blob ids are 16 hex digits of monotonic wall-clock nanoseconds plus 6 random
hex digits: they sort by creation time.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

import xxhash

from tiermem.errors import IntegrityError

__all__ = [
    "ID_RE",
    "TAIL_READ",
    "Key",
    "Loc",
    "decode_segment_index",
    "decode_tombs",
    "encode_segment",
    "encode_tombs",
    "new_id",
    "parse_location",
    "seq_of",
]

SEG_MAGIC = b"TMSEG001"
TOMB_MAGIC = b"TMDEL001"
FORMAT_VERSION = 1
_FOOTER = struct.Struct("<8sIIQQ")
_ENTRY = struct.Struct("<QQQIIQB3x")
_TOMB_HEAD = struct.Struct("<8sIIQ")
_TOMB_ENTRY = struct.Struct("<22sQQ")
ID_RE = re.compile(r"^[0-9a-f]{22}$")
_LOC_RE = re.compile(r"^seg/([0-9a-f]{22})@([0-9]+)\+([0-9]+)$")
TAIL_READ = 64 * 1024  # one ranged read covers the footer and the index of ~1450 pages

Key = tuple[int, int]

_id_lock = threading.Lock()
_last_ns = 0


def new_id() -> str:
    """A 22-character id that sorts by creation time (monotonic within this process)."""
    global _last_ns
    with _id_lock:
        _last_ns = max(time.time_ns(), _last_ns + 1)
        ns = _last_ns
    return f"{ns:016x}{os.urandom(3).hex()}"


def seq_of(seg_id: str) -> int:
    """The creation time encoded in a blob id."""
    return int(seg_id[:16], 16)


def parse_location(location: str) -> tuple[str, int, int] | None:
    """``seg/<id>@<offset>+<length>`` -> (segment id, offset, length), or None."""
    m = _LOC_RE.match(location)
    return (m[1], int(m[2]), int(m[3])) if m else None


class Loc(NamedTuple):
    """Where one live payload is."""

    seg: str
    offset: int
    length: int
    codec: int
    checksum: int
    seq: int


def encode_segment(entries: Sequence[tuple[Key, int, int, int, bytes]]) -> tuple[bytes, list[int]]:
    """Build a segment from ``(key, codec, checksum, seq, payload)``; returns (blob, offsets)."""
    offsets: list[int] = []
    index = bytearray()
    pos = 0
    for (page, gen), codec, checksum, seq, payload in entries:
        offsets.append(pos)
        index += _ENTRY.pack(page, gen, seq, pos, len(payload), checksum, codec)
        pos += len(payload)
    footer = _FOOTER.pack(
        SEG_MAGIC, len(entries), FORMAT_VERSION, pos, xxhash.xxh3_64_intdigest(bytes(index))
    )
    return b"".join([*(e[4] for e in entries), bytes(index), footer]), offsets


def decode_segment_index(tail: bytes, size: int) -> tuple[int, int] | list[tuple[Key, Loc]]:
    """Parse a segment's entries from its last ``len(tail)`` bytes.

    Returns the entries, or ``(index_offset, index_length)`` when ``tail`` is too
    short to hold the whole index (read that range and call again). Raises
    IntegrityError on a bad footer or index.
    """
    if len(tail) < _FOOTER.size:
        raise IntegrityError(f"segment of {size} bytes is too short for a footer")
    magic, count, version, index_off, index_sum = _FOOTER.unpack(tail[-_FOOTER.size :])
    if magic != SEG_MAGIC or version != FORMAT_VERSION:
        raise IntegrityError("segment footer has a bad magic or version")
    index_len = count * _ENTRY.size
    if index_off + index_len + _FOOTER.size != size:
        raise IntegrityError(f"segment footer ({count} entries at {index_off}) does not fit its {size} bytes")
    start = index_off - (size - len(tail))
    if start < 0:
        return index_off, index_len
    index = tail[start : start + index_len]
    if xxhash.xxh3_64_intdigest(index) != index_sum:
        raise IntegrityError("segment index checksum mismatch")
    out: list[tuple[Key, Loc]] = []
    for page, gen, seq, off, length, checksum, codec in _ENTRY.iter_unpack(index):
        if off + length > index_off:
            raise IntegrityError("segment index entry points past the payload area")
        out.append(((page, gen), Loc("", off, length, codec, checksum, seq)))
    return out


def encode_tombs(entries: Sequence[tuple[str, Key]]) -> bytes:
    """A tombstone blob for ``(segment id, key)`` pairs."""
    body = b"".join(_TOMB_ENTRY.pack(seg.encode(), page, gen) for seg, (page, gen) in entries)
    return _TOMB_HEAD.pack(TOMB_MAGIC, len(entries), FORMAT_VERSION, xxhash.xxh3_64_intdigest(body)) + body


def decode_tombs(data: bytes) -> list[tuple[str, Key]]:
    """Parse a tombstone blob; IntegrityError if it is damaged."""
    magic, count, version, body_sum = _TOMB_HEAD.unpack_from(data)
    body = data[_TOMB_HEAD.size :]
    if magic != TOMB_MAGIC or version != FORMAT_VERSION or len(body) != count * _TOMB_ENTRY.size:
        raise IntegrityError("tombstone blob has a bad header")
    if xxhash.xxh3_64_intdigest(body) != body_sum:
        raise IntegrityError("tombstone blob checksum mismatch")
    return [(seg.decode(), (page, gen)) for seg, page, gen in _TOMB_ENTRY.iter_unpack(body)]
