"""The segment and tombstone blob formats (shared by the local and S3 stores).

A segment blob (an S3 object, or a local file) is a sequence of *records*; an
S3 object holds exactly one, a local file appends one per put batch until it
is full. A record::

    head (16 B) | payload_0 .. payload_n-1 | index (n x 44 B) | footer (32 B)

- head ``<8sI4x>``: magic ``TMREC001``, length of the rest of the record, so a
  reader can walk a file record by record;
- index entry ``<QQQIIQB3x``: page, generation, seq, offset, length, xxh3-64 of
  the raw page, codec. Offsets count from the start of the record's body (after
  the head). ``seq`` is the time of the *original* put; compaction keeps it, so
  when two records hold the same (page, generation) the newer write wins (ties:
  the newer segment, i.e. the compacted copy);
- footer ``<8sIIQQ``: magic ``TMSEG001``, entry count, format version, index
  offset, xxh3-64 of the index. One ranged read of a record's tail gives its
  whole index, so a restarted process can rebuild its map.

A torn append can only leave an incomplete last record: its footer does not
validate, and readers stop there.

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
    "HEAD_SIZE",
    "ID_RE",
    "TAIL_READ",
    "Key",
    "Loc",
    "coalesce",
    "decode_head",
    "decode_index",
    "decode_tombs",
    "encode_record",
    "encode_tombs",
    "new_id",
    "parse_location",
    "seq_of",
]

REC_MAGIC = b"TMREC001"
SEG_MAGIC = b"TMSEG001"
TOMB_MAGIC = b"TMDEL001"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sI4x")
HEAD_SIZE = _HEAD.size
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


def encode_record(entries: Sequence[tuple[Key, int, int, int, bytes]]) -> tuple[bytes, list[int]]:
    """Build a record from ``(key, codec, checksum, seq, payload)``.

    Returns the record and each payload's offset from the start of the record.
    """
    offsets: list[int] = []
    index = bytearray()
    pos = 0
    for (page, gen), codec, checksum, seq, payload in entries:
        offsets.append(HEAD_SIZE + pos)
        index += _ENTRY.pack(page, gen, seq, pos, len(payload), checksum, codec)
        pos += len(payload)
    footer = _FOOTER.pack(
        SEG_MAGIC, len(entries), FORMAT_VERSION, pos, xxhash.xxh3_64_intdigest(bytes(index))
    )
    body_len = pos + len(index) + len(footer)
    return b"".join(
        [_HEAD.pack(REC_MAGIC, body_len), *(e[4] for e in entries), bytes(index), footer]
    ), offsets


def decode_head(head: bytes) -> int:
    """The body length a record head announces; IntegrityError if it is not a record head."""
    if len(head) < HEAD_SIZE:
        raise IntegrityError("record head is truncated")
    magic, body_len = _HEAD.unpack_from(head)
    if magic != REC_MAGIC or body_len < _FOOTER.size:
        raise IntegrityError("not a record head")
    return int(body_len)


def decode_index(tail: bytes, body_len: int, base: int) -> tuple[int, int] | list[tuple[Key, Loc]]:
    """Parse a record's entries from the last ``len(tail)`` bytes of its body.

    ``base`` is where the record starts in its blob; returned offsets are
    absolute. Returns ``(index offset, index length)`` from the body start
    instead when ``tail`` is too short to hold the whole index (read that range
    and call again). Raises IntegrityError on a bad footer or index.
    """
    if len(tail) < _FOOTER.size:
        raise IntegrityError(f"record of {body_len} bytes is too short for a footer")
    magic, count, version, index_off, index_sum = _FOOTER.unpack(tail[-_FOOTER.size :])
    if magic != SEG_MAGIC or version != FORMAT_VERSION:
        raise IntegrityError("record footer has a bad magic or version")
    index_len = count * _ENTRY.size
    if index_off + index_len + _FOOTER.size != body_len:
        raise IntegrityError(
            f"record footer ({count} entries at {index_off}) does not fit its {body_len} bytes"
        )
    start = index_off - (body_len - len(tail))
    if start < 0:
        return index_off, index_len
    index = tail[start : start + index_len]
    if xxhash.xxh3_64_intdigest(index) != index_sum:
        raise IntegrityError("record index checksum mismatch")
    out: list[tuple[Key, Loc]] = []
    first = base + HEAD_SIZE
    for page, gen, seq, off, length, checksum, codec in _ENTRY.iter_unpack(index):
        if off + length > index_off:
            raise IntegrityError("record index entry points past the payload area")
        out.append(((page, gen), Loc("", first + off, length, codec, checksum, seq)))
    return out


def encode_tombs(entries: Sequence[tuple[str, Key]]) -> bytes:
    """A tombstone blob for ``(segment id, key)`` pairs."""
    body = b"".join(_TOMB_ENTRY.pack(seg.encode(), page, gen) for seg, (page, gen) in entries)
    return _TOMB_HEAD.pack(TOMB_MAGIC, len(entries), FORMAT_VERSION, xxhash.xxh3_64_intdigest(body)) + body


def decode_tombs(data: bytes) -> list[tuple[str, Key]]:
    """Parse a tombstone blob; IntegrityError if it is damaged."""
    if len(data) < _TOMB_HEAD.size:
        raise IntegrityError("tombstone blob is truncated")
    magic, count, version, body_sum = _TOMB_HEAD.unpack_from(data)
    body = data[_TOMB_HEAD.size :]
    if magic != TOMB_MAGIC or version != FORMAT_VERSION or len(body) != count * _TOMB_ENTRY.size:
        raise IntegrityError("tombstone blob has a bad header")
    if xxhash.xxh3_64_intdigest(body) != body_sum:
        raise IntegrityError("tombstone blob checksum mismatch")
    return [(seg.decode(), (page, gen)) for seg, page, gen in _TOMB_ENTRY.iter_unpack(body)]


def coalesce(locs: Sequence[Loc], max_gap: int, max_span: int) -> list[tuple[str, int, int, list[int]]]:
    """Plan reads for ``locs``: ``(segment, start, end, member indexes)`` per read.

    Payloads of one segment closer than ``max_gap`` bytes are read together, up
    to ``max_span`` bytes per read.
    """
    by_seg: dict[str, list[int]] = {}
    for i, loc in enumerate(locs):
        by_seg.setdefault(loc.seg, []).append(i)
    ranges: list[tuple[str, int, int, list[int]]] = []
    for seg, idx in by_seg.items():
        idx.sort(key=lambda i: locs[i].offset)
        start = locs[idx[0]].offset
        end = start + locs[idx[0]].length
        members = [idx[0]]
        for i in idx[1:]:
            loc = locs[i]
            if loc.offset - end <= max_gap and loc.offset + loc.length - start <= max_span:
                end = max(end, loc.offset + loc.length)
                members.append(i)
            else:
                ranges.append((seg, start, end, members))
                start, end, members = loc.offset, loc.offset + loc.length, [i]
        ranges.append((seg, start, end, members))
    return ranges
