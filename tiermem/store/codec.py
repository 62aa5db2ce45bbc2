"""The page codec shared by every store: zero detection, checksum, compression.

A page becomes ``(codec, payload)`` plus a tag. Stores tag pages with a keyed MAC
(:mod:`tiermem.store.pagemac`); :func:`encode` and :func:`decode` keep an xxh3-64
checksum for callers that only need a fast corruption check:

- an all-zero page is ``Codec.ZERO`` with an empty payload; it is recorded in
  the index and never sent to a backend;
- the tag covers the *raw* page, so it verifies the whole path (compression,
  transport, storage, decompression) in one check;
- ``zstd`` (level 1) or ``lz4`` (block mode) compress a page when the policy asks
  for it; a page whose compressed form saves less than 5% is stored ``RAW``,
  because decompressing it would cost time for no gain.

No trained zstd dictionary: it would have to be versioned and stored beside the
data (a page is unreadable without its dictionary), and per-page level-1 zstd
already takes zero-heavy and text pages down to tens of bytes.

:func:`decode` never returns bad data: any length, checksum or decompression
failure raises :class:`~tiermem.errors.IntegrityError`.
"""

from __future__ import annotations

import threading

import lz4.block
import xxhash
import zstandard

from tiermem.errors import IntegrityError, InvalidArgument
from tiermem.model import Compression
from tiermem.store.base import Codec

__all__ = [
    "COMPRESSIONS",
    "as_codec",
    "compression_name",
    "decode",
    "decode_raw",
    "encode",
    "encode_page",
    "encode_raw",
    "zero_checksum",
]

COMPRESSIONS = ("none", "zstd", "lz4")
"""Compression names a policy may choose."""

_RAW_IF_AT_LEAST = 0.95
"""A compressed payload this large (fraction of the page) is stored raw instead."""
_ZSTD_LEVEL = 1
"""Level 1: on 4 KiB pages levels 1 and 3 compress alike, and 1 is twice as fast on mixed pages."""

_xxh3 = xxhash.xxh3_64_intdigest
_zero_pages: dict[int, bytes] = {}
_tls = threading.local()  # zstd (de)compressor objects are not thread-safe; one pair per thread


def _zero(page_size: int) -> bytes:
    z = _zero_pages.get(page_size)
    if z is None:
        z = _zero_pages[page_size] = bytes(page_size)
    return z


def zero_checksum(page_size: int) -> int:
    """The checksum recorded for a zero page of ``page_size`` bytes."""
    return _xxh3(_zero(page_size))


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_tls, "zc", None)
    if c is None:
        c = _tls.zc = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


def compression_name(compression: object) -> str:
    """Validate a compression choice (a name, or the model's Compression enum) and return its name."""
    name = getattr(compression, "value", compression)
    if name not in COMPRESSIONS:
        raise InvalidArgument(f"unknown compression {name!r}: use one of {', '.join(COMPRESSIONS)}")
    return str(name)


def encode(data: bytes | memoryview, compression: str | Compression = "none") -> tuple[Codec, bytes, int]:
    """Encode one raw page: returns ``(codec, payload, checksum)``.

    ``compression`` is ``none``, ``zstd`` or ``lz4``. A zero page gives
    ``(Codec.ZERO, b"", checksum)``.
    """
    return encode_page(data, compression_name(compression))


def encode_page(data: bytes | memoryview, name: str) -> tuple[Codec, bytes, int]:
    """:func:`encode` for a name already checked by :func:`compression_name`."""
    raw = bytes(data)  # no copy when data is already bytes
    c, payload = encode_raw(raw, name)
    return c, payload, _xxh3(raw)


def encode_raw(raw: bytes, name: str) -> tuple[Codec, bytes]:
    """``(codec, payload)`` of one raw page, no checksum (the store adds its MAC): the per-page hot path."""
    if not raw:
        raise InvalidArgument("cannot encode an empty page")
    if raw == _zero(len(raw)):
        return Codec.ZERO, b""
    if name == "none":
        return Codec.RAW, raw
    if name == "zstd":
        payload: bytes = _zstd_c().compress(raw)
        codec = Codec.ZSTD
    else:
        payload = lz4.block.compress(raw, store_size=False)
        codec = Codec.LZ4
    if len(payload) >= _RAW_IF_AT_LEAST * len(raw):
        return Codec.RAW, raw
    return codec, payload


def as_codec(value: Codec | int, page: int | None = None) -> Codec:
    """``value`` as a Codec; IntegrityError for an unknown one. Members pass without an enum lookup
    (microseconds on the fault path)."""
    if type(value) is Codec:
        return value
    try:
        return Codec(value)
    except ValueError:
        where = "a page entry" if page is None else f"the entry of page {page}"
        raise IntegrityError(f"unknown codec {value!r} in {where}") from None


def decode(codec: Codec | int, payload: bytes | memoryview, checksum: int, page_size: int) -> bytes:
    """Decode and verify one payload against its xxh3-64; raises IntegrityError on any mismatch."""
    raw = decode_raw(codec, payload, page_size)
    got = _xxh3(raw)
    if got != checksum:
        raise IntegrityError(
            f"{as_codec(codec).name} page checksum mismatch: stored {checksum:#018x}, read {got:#018x}"
        )
    return raw


def decode_raw(codec: Codec | int, payload: bytes | memoryview, page_size: int) -> bytes:
    """Decode one payload and check its length (the caller verifies the page's MAC)."""
    codec = as_codec(codec)
    if codec is Codec.ZERO:
        if len(payload):
            raise IntegrityError(f"zero page entry carries a {len(payload)}-byte payload")
        raw = _zero(page_size)
    elif codec is Codec.RAW:
        raw = payload if type(payload) is bytes else bytes(payload)  # bytes are immutable: no copy needed
    elif codec is Codec.ZSTD:
        try:
            # max_output_size binds only frames that do not declare their size: a forged frame declaring
            # 100 MiB of zeros fits in 4 KiB and would be inflated in full. Refuse any other size first.
            declared = zstandard.frame_content_size(payload)
            if declared not in (-1, page_size):
                raise IntegrityError(f"zstd payload declares {declared} bytes, expected {page_size}")
            raw = _zstd_d().decompress(payload, max_output_size=page_size)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"zstd payload does not decompress: {e}") from None
    else:
        try:
            raw = lz4.block.decompress(payload, uncompressed_size=page_size)
        except (lz4.block.LZ4BlockError, ValueError) as e:
            raise IntegrityError(f"lz4 payload does not decompress: {e}") from None
    if len(raw) != page_size:
        raise IntegrityError(f"{codec.name} payload decodes to {len(raw)} bytes, expected {page_size}")
    return raw
