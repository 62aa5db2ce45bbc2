"""The page contents model shared by every guest (sim, process guest, KVM guest).

Every guest page holds a little-endian u32 *write counter* at ``COUNTER_OFFSET``;
a guest write increments it by one. A page whose counter is not zero also holds
its own page index as a u64 at ``PAGE_INDEX_OFFSET``, and zeros elsewhere. So:

* a page never written is all zeros (like freshly booted guest RAM, and like a
  punched page), and zero pages are what page stores skip;
* a page served to the wrong address is caught by the index stamp, a stale page
  by the counter.

``page_bytes(page, counter)`` materialises the exact bytes; the vectorised
helpers apply guest writes to, and check, a whole memory image held as a numpy
``uint8`` array (the sim's real-bytes mode and the process guest's mapping).
"""

from __future__ import annotations

import numpy as np

from tiermem.errors import InvalidArgument

__all__ = [
    "COUNTER_OFFSET",
    "PAGE_INDEX_OFFSET",
    "apply_writes",
    "check_image",
    "counter_of",
    "counters_of",
    "decode_pages",
    "page_bytes",
    "page_index_of",
    "pages_bytes",
    "valid_page",
]

COUNTER_OFFSET = 0
PAGE_INDEX_OFFSET = 8
_MIN_PAGE = 64


def _check_page_size(page_size: int) -> None:
    if page_size < _MIN_PAGE or page_size & (page_size - 1):
        raise InvalidArgument(f"page size must be a power of two >= {_MIN_PAGE}, got {page_size}")


def page_bytes(page: int, counter: int, page_size: int = 4096) -> bytes:
    """The exact contents of guest page ``page`` after ``counter`` writes."""
    if counter == 0:
        return bytes(page_size)
    buf = bytearray(page_size)
    buf[COUNTER_OFFSET : COUNTER_OFFSET + 4] = (counter & 0xFFFF_FFFF).to_bytes(4, "little")
    buf[PAGE_INDEX_OFFSET : PAGE_INDEX_OFFSET + 8] = page.to_bytes(8, "little")
    return bytes(buf)


def pages_bytes(pages: np.ndarray, counters: np.ndarray, page_size: int = 4096) -> bytes:
    """``page_bytes`` of many pages, concatenated (vectorised)."""
    _check_page_size(page_size)
    pages = np.asarray(pages, dtype=np.uint64)
    counters = np.asarray(counters, dtype=np.uint32)
    img = np.zeros((len(pages), page_size), dtype=np.uint8)
    img.view("<u4")[:, COUNTER_OFFSET // 4] = counters
    img.view("<u8")[:, PAGE_INDEX_OFFSET // 8] = np.where(counters != 0, pages, 0)
    return img.tobytes()


def counter_of(data: bytes | bytearray | memoryview) -> int:
    """The write counter stored in one page's bytes."""
    return int.from_bytes(bytes(data[COUNTER_OFFSET : COUNTER_OFFSET + 4]), "little")


def page_index_of(data: bytes | bytearray | memoryview) -> int:
    """The page index stamped in one page's bytes (0 for a never-written page)."""
    return int.from_bytes(bytes(data[PAGE_INDEX_OFFSET : PAGE_INDEX_OFFSET + 8]), "little")


def valid_page(data: bytes | bytearray | memoryview, page: int) -> bool:
    """True if ``data`` is exactly ``page_bytes(page, counter_of(data))``."""
    return bytes(data) == page_bytes(page, counter_of(data), len(data))


def counters_of(image: np.ndarray | bytes, page_size: int = 4096) -> np.ndarray:
    """The counters of consecutive pages in a memory image (uint32 array, a copy)."""
    _check_page_size(page_size)
    arr = np.frombuffer(image, dtype=np.uint8) if isinstance(image, bytes | bytearray) else image
    if arr.size % page_size:
        raise InvalidArgument(f"image of {arr.size} bytes is not a whole number of {page_size}-byte pages")
    return np.array(arr.reshape(-1, page_size).view("<u4")[:, COUNTER_OFFSET // 4])


def apply_writes(image: np.ndarray, pages: np.ndarray, page_size: int = 4096) -> None:
    """Apply guest writes to ``pages`` (duplicates count) on a uint8 memory image, in place."""
    pages = np.asarray(pages, dtype=np.int64)
    if len(pages) == 0:
        return
    pages2d = image.reshape(-1, page_size)
    np.add.at(pages2d.view("<u4")[:, COUNTER_OFFSET // 4], pages, np.uint32(1))
    pages2d.view("<u8")[pages, PAGE_INDEX_OFFSET // 8] = pages.astype(np.uint64)


def decode_pages(
    data: bytes | bytearray | memoryview | np.ndarray, first_page: int = 0, page_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Decode consecutive pages ``first_page, first_page+1, ...`` held in ``data``.

    Returns (counters as uint32, valid) where ``valid[i]`` says page i is exactly
    ``page_bytes(first_page + i, counters[i])``: bytes 4..7 zero, the right index
    stamp (or zero when the counter is zero) and zeros elsewhere.
    """
    _check_page_size(page_size)
    arr = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if arr.size % page_size:
        raise InvalidArgument(f"{arr.size} bytes are not a whole number of {page_size}-byte pages")
    words = arr.reshape(-1, page_size).view("<u8")
    first = words[:, 0]
    ctr = (first & np.uint64(0xFFFF_FFFF)).astype(np.uint32)
    idx = np.arange(first_page, first_page + words.shape[0], dtype=np.uint64)
    valid = first == ctr.astype(np.uint64)
    valid &= words[:, 1] == np.where(ctr != 0, idx, np.uint64(0))
    valid &= ~words[:, 2:].any(axis=1)
    return ctr, valid


def check_image(image: np.ndarray, expected: np.ndarray, page_size: int = 4096) -> np.ndarray:
    """Indices of pages of a whole memory image that differ from ``page_bytes(page, expected[page])``."""
    ctr, valid = decode_pages(image, 0, page_size)
    return np.flatnonzero(~valid | (ctr != np.asarray(expected, dtype=np.uint32)))
