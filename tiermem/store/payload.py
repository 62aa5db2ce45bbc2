"""``PayloadStore``: the part of every store that is not about the backend.

It validates input, runs the codec, tags every page with its keyed MAC
(:mod:`tiermem.store.pagemac`), keeps zero pages away from the backend,
verifies every payload read back against its MAC, and accounts zero pages. A backend implements
five hooks that only move opaque payload bytes:

- ``_put_payloads(vm_id, items) -> locations`` (durable before it returns),
- ``_get_payloads(vm_id, entries) -> payloads`` (raises NotFound if one is missing),
- ``_delete_payloads(vm_id, entries)``,
- ``_purge(vm_id) -> payloads removed``,
- ``_payload_usage(vm_id | None) -> (payloads, payload bytes)``.

Zero pages are a tally in this process only (puts minus deletes, never below
zero): they never reach a backend, so no backend can count them after a
restart, and remembering each one would cost memory per zero page. The agent's
index is their exact and durable record; deleting the same zero entry twice
makes the tally low.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from typing import NamedTuple

from tiermem.errors import IntegrityError, InvalidArgument
from tiermem.store import codec
from tiermem.store.base import Codec, PageBlob, PageStore, StoredPage, UsageStats
from tiermem.store.pagemac import PageKeyring
from tiermem.store.space import validate_space

__all__ = ["MAX_INDEX", "EncodedPage", "PayloadStore", "check_page_size"]

MAX_INDEX = (1 << 63) - 1
"""Largest page number or generation a store accepts (they are stored as u64)."""


class EncodedPage(NamedTuple):
    """A non-zero page after the codec: what a backend stores."""

    page: int
    generation: int
    codec: Codec
    checksum: int
    """The page's MAC tag (tiermem.store.pagemac)."""
    payload: bytes


def _encoded(fields: tuple[int, int, Codec, int, bytes]) -> EncodedPage:
    return tuple.__new__(EncodedPage, fields)  # skips NamedTuple's keyword handling: ~2x faster


def check_page_size(page_size: int) -> int:
    """Validate a page size: a power of two from 4 KiB to 2 MiB."""
    if (
        not isinstance(page_size, int)
        or page_size < 4096
        or page_size > 2 << 20
        or page_size & (page_size - 1)
    ):
        raise InvalidArgument(f"invalid page size {page_size!r}: use a power of two from 4096 to 2097152")
    return page_size


def _check_index(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INDEX:
        raise InvalidArgument(f"invalid {what} {value!r}: use an integer from 0 to 2**63-1")
    return value


class PayloadStore(PageStore):
    """A PageStore whose backend stores encoded payloads; see the module docstring."""

    def __init__(self, name: str = "default", page_size: int = 4096) -> None:
        super().__init__(name, check_page_size(page_size))
        self._zero_lock = threading.Lock()
        self._zeros: dict[str, int] = {}
        self.keyring = PageKeyring.process()
        """The page MAC keys: this process's random keyring until the owner installs its own (the
        agent installs the keyring of its data dir), so pages never verify under a key nobody chose."""

    # -- backend hooks -------------------------------------------------------------

    @abc.abstractmethod
    def _put_payloads(self, vm_id: str, items: Sequence[EncodedPage]) -> list[str]:
        """Durably store ``items`` (all or none); return one location per item."""

    @abc.abstractmethod
    def _get_payloads(self, vm_id: str, entries: Sequence[StoredPage]) -> list[bytes]:
        """Return the stored payload of each entry, in order; NotFound if one is missing."""

    @abc.abstractmethod
    def _delete_payloads(self, vm_id: str, entries: Sequence[StoredPage]) -> None:
        """Remove the payloads of ``entries``; missing ones are ignored."""

    @abc.abstractmethod
    def _purge(self, vm_id: str) -> int:
        """Remove everything stored for ``vm_id``; return how many payloads were removed."""

    @abc.abstractmethod
    def _payload_usage(self, vm_id: str | None) -> tuple[int, int]:
        """``(payloads, payload bytes)`` held for one VM or all."""

    # -- the PageStore interface ---------------------------------------------------

    def put_pages(self, vm_id: str, pages: Sequence[PageBlob], compression: str = "none") -> list[StoredPage]:
        """Encode and durably write a batch; zero pages come back as Codec.ZERO and are not sent."""
        validate_space(vm_id)
        name = codec.compression_name(compression)
        mac = self.keyring.mac
        ps = self.page_size
        seen: set[tuple[int, int]] = set()
        plan: list[tuple[int, int, Codec, bytes, int]] = []
        items: list[EncodedPage] = []
        for blob in pages:  # the eviction hot path: keep the per-page work small
            page, gen, data = blob.page, blob.generation, blob.data
            if (
                type(page) is not int
                or type(gen) is not int
                or not (0 <= page <= MAX_INDEX and 0 <= gen <= MAX_INDEX)
            ):
                _check_index(page, "page")
                _check_index(gen, "generation")
            key = (page, gen)
            if key in seen:
                raise InvalidArgument(f"page {page} generation {gen} appears twice in one batch")
            seen.add(key)
            if len(data) != ps:
                raise InvalidArgument(f"page {page} has {len(data)} bytes; this store's page size is {ps}")
            raw = data if type(data) is bytes else bytes(data)
            c, payload = codec.encode_raw(raw, name)
            checksum = mac(vm_id, page, gen, raw)
            plan.append((page, gen, c, payload, checksum))
            if c is not Codec.ZERO:
                items.append(_encoded((page, gen, c, checksum, payload)))
        locations = iter(self._put_payloads(vm_id, items) if items else [])
        out = [
            StoredPage(page, gen, c, checksum, len(payload), next(locations) if payload else "")
            for page, gen, c, payload, checksum in plan
        ]
        zeros = len(plan) - len(items)
        if zeros:
            with self._zero_lock:
                self._zeros[vm_id] = self._zeros.get(vm_id, 0) + zeros
        return out

    def get_pages(self, vm_id: str, entries: Sequence[StoredPage]) -> list[bytes]:
        """Fetch and verify a batch; zero entries are answered without touching the backend."""
        validate_space(vm_id)
        if len(entries) == 1:  # the common fault (no prefetch): measured ~5 µs cheaper than the batch path
            e = entries[0]
            c = self._check_entry(e)
            payload = b"" if c is Codec.ZERO else self._get_payloads(vm_id, entries)[0]
            return [self._decode_checked(vm_id, e, c, payload)]
        codecs = [self._check_entry(e) for e in entries]
        stored = [e for e, c in zip(entries, codecs, strict=True) if c is not Codec.ZERO]
        payloads = iter(self._get_payloads(vm_id, stored) if stored else [])
        out: list[bytes] = []
        for e, c in zip(entries, codecs, strict=True):
            out.append(self._decode_checked(vm_id, e, c, b"" if c is Codec.ZERO else next(payloads)))
        return out

    def _decode_checked(self, space: str, e: StoredPage, c: Codec, payload: bytes) -> bytes:
        if len(payload) != e.length:
            raise IntegrityError(
                f"page {e.page} generation {e.generation}: stored payload has {len(payload)} bytes, "
                f"the index says {e.length}"
            )
        raw = codec.decode_raw(c, payload, self.page_size)
        if not self.keyring.verify(space, e.page, e.generation, raw, e.checksum):
            # forged, corrupted, or another VM's/incarnation's page: never returned for install
            raise IntegrityError(
                f"page {e.page} generation {e.generation} of {space}: MAC mismatch ({c.name} payload)"
            )
        return raw

    def delete_pages(self, vm_id: str, entries: Sequence[StoredPage]) -> None:
        """Forget pages that are back in guest memory; missing ones are ignored."""
        validate_space(vm_id)
        stored = [e for e in entries if self._check_entry(e) is not Codec.ZERO]
        zeros = len(entries) - len(stored)
        if zeros:
            with self._zero_lock:
                left = self._zeros.get(vm_id, 0) - zeros
                if left > 0:
                    self._zeros[vm_id] = left
                else:
                    self._zeros.pop(vm_id, None)
        if stored:
            self._delete_payloads(vm_id, stored)

    def purge_vm(self, vm_id: str) -> int:
        """Remove everything held for ``vm_id``; returns stored plus zero pages removed."""
        validate_space(vm_id)
        removed = self._purge(vm_id)
        with self._zero_lock:
            removed += self._zeros.pop(vm_id, 0)
        return removed

    def usage(self, vm_id: str | None = None) -> UsageStats:
        """Payloads and bytes held (from the backend) plus zero pages known to this process."""
        if vm_id is not None:
            validate_space(vm_id)
        pages, stored = self._payload_usage(vm_id)
        with self._zero_lock:
            zeros = self._zeros.get(vm_id, 0) if vm_id is not None else sum(self._zeros.values())
        return UsageStats(
            pages=pages, zero_pages=zeros, stored_bytes=stored, logical_bytes=(pages + zeros) * self.page_size
        )

    def _check_entry(self, e: StoredPage) -> Codec:
        _check_index(e.page, "page")
        _check_index(e.generation, "generation")
        c = codec.as_codec(e.codec, e.page)
        if c is not Codec.ZERO and not 0 < e.length <= self.page_size:
            raise IntegrityError(f"page {e.page}: entry length {e.length} is outside 1..{self.page_size}")
        return c
