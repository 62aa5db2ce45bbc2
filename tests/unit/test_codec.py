"""The page codec: zero pages, compression choice, and verification that never returns bad data."""

from __future__ import annotations

import os
import random
import threading

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.errors import IntegrityError, InvalidArgument
from tiermem.model import Compression
from tiermem.store.base import Codec
from tiermem.store.codec import decode, encode, zero_checksum

PS = 4096
RANDOM = os.urandom(PS)
TEXT = (b"tiermem keeps cold pages elsewhere; " * 200)[:PS]
ZERO = bytes(PS)


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
@pytest.mark.parametrize(
    "page", [RANDOM, TEXT, ZERO, b"\x00" * (PS - 1) + b"\x01"], ids=["random", "text", "zero", "last-byte"]
)
def test_round_trip(compression: str, page: bytes) -> None:
    codec, payload, checksum = encode(page, compression)
    assert checksum == xxhash.xxh3_64_intdigest(page)
    assert decode(codec, payload, checksum, PS) == page


def test_zero_page_is_zero_codec_with_no_payload() -> None:
    for compression in ("none", "zstd", "lz4"):
        assert encode(ZERO, compression) == (Codec.ZERO, b"", zero_checksum(PS))


@pytest.mark.parametrize("compression,codec", [("zstd", Codec.ZSTD), ("lz4", Codec.LZ4)])
def test_compressible_page_is_compressed(compression: str, codec: Codec) -> None:
    got, payload, _ = encode(TEXT, compression)
    assert got is codec
    assert len(payload) < PS // 10


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_incompressible_page_is_stored_raw(compression: str) -> None:
    codec, payload, _ = encode(RANDOM, compression)
    assert codec is Codec.RAW
    assert payload == RANDOM


def test_none_never_compresses() -> None:
    assert encode(TEXT, "none")[:2] == (Codec.RAW, TEXT)


def test_accepts_memoryview_and_the_model_enum() -> None:
    buf = bytearray(PS * 2)
    buf[PS : PS * 2] = TEXT
    codec, payload, checksum = encode(memoryview(buf)[PS:], Compression.ZSTD)
    assert codec is Codec.ZSTD
    assert decode(codec, memoryview(payload), checksum, PS) == TEXT


def test_bad_compression_name() -> None:
    with pytest.raises(InvalidArgument, match="unknown compression 'gzip'"):
        encode(TEXT, "gzip")


def test_empty_page_rejected() -> None:
    with pytest.raises(InvalidArgument):
        encode(b"", "none")


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
def test_flipped_byte_raises(compression: str) -> None:
    codec, payload, checksum = encode(TEXT, compression)
    bad = bytearray(payload)
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(IntegrityError):
        decode(codec, bytes(bad), checksum, PS)


def test_wrong_checksum_raises() -> None:
    codec, payload, checksum = encode(RANDOM, "none")
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        decode(codec, payload, checksum ^ 1, PS)


def test_truncated_raw_payload_raises() -> None:
    codec, payload, checksum = encode(RANDOM, "none")
    with pytest.raises(IntegrityError, match="4095 bytes"):
        decode(codec, payload[:-1], checksum, PS)


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_truncated_compressed_payload_raises(compression: str) -> None:
    codec, payload, checksum = encode(TEXT, compression)
    with pytest.raises(IntegrityError):
        decode(codec, payload[:-3], checksum, PS)


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_page_size_mismatch_raises(compression: str) -> None:
    codec, payload, checksum = encode(TEXT, compression)
    with pytest.raises(IntegrityError):
        decode(codec, payload, checksum, PS * 2)


def test_zero_entry_with_payload_or_wrong_checksum_raises() -> None:
    with pytest.raises(IntegrityError, match="payload"):
        decode(Codec.ZERO, b"x", zero_checksum(PS), PS)
    with pytest.raises(IntegrityError, match="checksum"):
        decode(Codec.ZERO, b"", 12345, PS)


def test_unknown_codec_raises() -> None:
    with pytest.raises(IntegrityError, match="unknown codec"):
        decode(9, b"x", 0, PS)


def test_larger_page_size() -> None:
    page = TEXT * 4
    codec, payload, checksum = encode(page, "zstd")
    assert decode(codec, payload, checksum, 4 * PS) == page


def test_threads_share_the_codec_safely() -> None:
    pages = [bytes([i]) * 100 + os.urandom(200) + bytes(PS - 300) for i in range(64)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                for p in pages:
                    c, payload, s = encode(p, "zstd")
                    assert decode(c, payload, s, PS) == p
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _runs(runs: list[tuple[int, int]]) -> bytes:
    out = b"".join(bytes([v]) * n for v, n in runs)
    return (out * (PS // max(len(out), 1) + 1))[:PS]


# Small inputs that expand to whole pages: runs of bytes (compressible, often zero-heavy)
# and seeded random pages (incompressible).
_pages = st.one_of(
    st.lists(
        st.tuples(st.sampled_from([0, 0, 1, 97, 255]), st.integers(1, 700)), min_size=1, max_size=30
    ).map(_runs),
    st.integers(0, 2**32).map(lambda seed: random.Random(seed).randbytes(PS)),
)


@settings(max_examples=60, deadline=None)
@given(page=_pages, compression=st.sampled_from(["none", "zstd", "lz4"]))
def test_property_round_trip(page: bytes, compression: str) -> None:
    codec, payload, checksum = encode(page, compression)
    assert len(payload) <= PS
    assert decode(codec, payload, checksum, PS) == page


@settings(max_examples=150, deadline=None)
@given(
    page=_pages,
    compression=st.sampled_from(["none", "zstd", "lz4"]),
    where=st.integers(0, 1 << 30),
    bit=st.integers(0, 7),
)
def test_property_corruption_never_returns_bad_data(
    page: bytes, compression: str, where: int, bit: int
) -> None:
    codec, payload, checksum = encode(page, compression)
    if not payload:
        return
    bad = bytearray(payload)
    bad[where % len(bad)] ^= 1 << bit
    try:
        got = decode(codec, bytes(bad), checksum, PS)
    except IntegrityError:
        return
    assert got == page  # a flip in a bit the decoder ignores is fine; wrong data is not


def test_zstd_bomb_declaring_a_large_size_is_refused_without_inflating() -> None:
    """Issue 17 item 11: max_output_size binds only frames without a declared size; a 3 KiB frame
    declaring 100 MiB of zeros was inflated in full. It is refused from its header now."""
    import tracemalloc

    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (100 << 20))
    assert len(bomb) <= 4096  # fits in a page entry
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="declares 104857600 bytes"):
            decode(Codec.ZSTD, bomb, 0, 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (100 << 20))
    with pytest.raises(IntegrityError):
        decode(Codec.ZSTD, unsized, 0, 4096)
