"""The page-store interface.

Why synchronous: the agent serves each VM's faults on its own thread (an epoll
loop on the uffd, never the gRPC event loop), and a fault must go from message
to UFFDIO_COPY with as few hops as possible. redis-py and boto3 are natively
blocking; an asyncio store would add an event-loop hop (tens of µs) to every
fault and force the fault threads to share one loop, so one VM's fault storm
could stall another's. Throughput comes from batches (one pipeline, one segment
PUT, coalesced ranged GETs), not from concurrency inside a call. Stores are
thread-safe: fault threads and the cycle thread call them concurrently.

A store sees only encoded payloads. :mod:`tiermem.store.codec` turns a page
into ``(codec, payload, checksum)``; zero pages never reach a backend; every
payload read back is verified before it is returned.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Codec", "PageBlob", "PageStore", "StoredPage", "UsageStats"]


class Codec(enum.IntEnum):
    """How a page's payload is encoded."""

    RAW = 0
    ZSTD = 1
    LZ4 = 2
    ZERO = 3
    """A zero page: recorded in the index only; nothing is stored."""


class PageBlob(NamedTuple):
    """A page to write: which page of which generation, and its raw bytes (page_size long).

    A NamedTuple rather than a frozen dataclass: one is built per evicted page on the
    eviction path, and a tuple costs a fraction of the dataclass constructor.
    """

    page: int
    generation: int
    data: bytes | memoryview


class StoredPage(NamedTuple):
    """Where and how one page was stored: the durable index entry for it.

    ``location`` is backend-specific and opaque to callers (a Redis key, an S3
    segment and byte range, a file offset). ``checksum`` is the xxh3-64 of the raw
    page; ``length`` is the stored payload length.
    """

    page: int
    generation: int
    codec: Codec
    checksum: int
    length: int
    location: str


@dataclass
class UsageStats:
    """What a store holds for one VM (or for all VMs)."""

    pages: int = 0
    zero_pages: int = 0
    stored_bytes: int = 0
    logical_bytes: int = 0


class PageStore(abc.ABC):
    """A place to keep evicted pages. Batches are the unit of every operation."""

    kind: str = "abstract"
    """``file``, ``redis``, ``s3`` or ``memory``."""

    def __init__(self, name: str = "default", page_size: int = 4096) -> None:
        self.name = name
        self.page_size = page_size

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The store URL with secrets redacted (safe to log and report)."""

    @abc.abstractmethod
    def put_pages(self, vm_id: str, pages: Sequence[PageBlob], compression: str = "none") -> list[StoredPage]:
        """Encode and durably write a batch; return one entry per input page, in order.

        Returns only after the backend acknowledged every write (invariant 1 of
        the brief). Zero pages come back with ``Codec.ZERO`` and are not sent.
        Raises StoreUnavailable, StoreFull or ConfigurationError; on error no
        entry is returned and the caller must not punch any page of the batch.
        """

    @abc.abstractmethod
    def get_pages(self, vm_id: str, entries: Sequence[StoredPage]) -> list[bytes]:
        """Fetch and verify a batch; return raw page bytes in input order.

        Raises IntegrityError if any payload fails its checksum or length check
        (nothing is returned for the batch), NotFound if one is missing, and
        StoreUnavailable on transport errors.
        """

    @abc.abstractmethod
    def delete_pages(self, vm_id: str, entries: Sequence[StoredPage]) -> None:
        """Forget pages that are back in guest memory. Missing pages are ignored."""

    @abc.abstractmethod
    def purge_vm(self, vm_id: str) -> int:
        """Remove everything held for ``vm_id`` without touching other VMs; returns pages removed."""

    @abc.abstractmethod
    def usage(self, vm_id: str | None = None) -> UsageStats:
        """Usage for one VM, or for the whole store."""

    def close(self) -> None:
        """Release connections and files."""
