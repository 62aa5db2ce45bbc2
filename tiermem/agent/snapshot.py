"""Import a Firecracker snapshot memory file into a page store, page by page.

Every non-zero page goes through the store's normal ``put_pages`` (its codec,
checksum or MAC, and compression), and its entry into the agent's index under the
VM's id, numbered by its offset in the memory file. Zero pages are stored nowhere:
the restore answers them with ``UFFDIO_ZEROPAGE``. Only a complete import is
recorded as *restorable* (``meta["snapshot"]["state"] == "ready"``): a failed one
leaves nothing behind, so a restore never serves zeros for pages that were never
imported.

Sources: a local file (read in chunks), or an object in S3
(``s3://bucket/key[?endpoint=http://host:port&region=...]``, credentials from the
standard AWS chain) streamed with ranged GETs, never downloaded whole.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import structlog

from tiermem.agent.index import PageIndex, VmRecord
from tiermem.errors import AlreadyExists, InvalidArgument, NotFound, StoreUnavailable, TiermemError
from tiermem.model import PAGE_SIZE, Backend, EvictionPolicy, now_ms, policy_to_dict, validate_id
from tiermem.store.base import PageBlob, PageStore
from tiermem.store.space import store_space

__all__ = [
    "CHUNK_PAGES",
    "MAX_SNAPSHOT_BYTES",
    "FileSource",
    "S3Source",
    "SnapshotInfo",
    "SnapshotSource",
    "import_snapshot",
    "open_source",
    "snapshot_meta",
    "snapshot_space",
]

log = structlog.get_logger("tiermem.agent.snapshot")

CHUNK_PAGES = 1024
"""Pages read (and put to the store) per batch: 4 MiB, one ranged GET from S3."""
MAX_SNAPSHOT_BYTES = 1 << 40


@dataclass(frozen=True)
class SnapshotInfo:
    """What an import stored: the answer of ``tiermem snapshot import``."""

    vm_id: str
    pages: int
    zero_pages: int
    stored_bytes: int
    store: str
    source: str
    socket: str = ""


class SnapshotSource(Protocol):
    """A memory file to import: its size, then its bytes in order."""

    description: str

    def size(self) -> int:
        """Bytes."""
        ...

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """The whole file, ``chunk_bytes`` at a time (the last chunk may be shorter)."""
        ...


class FileSource:
    """A memory file on the agent's host."""

    def __init__(self, path: str) -> None:
        if not os.path.isabs(path):
            raise InvalidArgument(f"mem file path must be absolute (it is read by the agent): {path!r}")
        self.path = path
        self.description = path
        try:
            st = os.stat(path)
        except OSError as e:
            raise NotFound(f"cannot read the memory file {path}: {e.strerror}") from None
        if not os.path.isfile(path):
            raise InvalidArgument(f"{path} is not a regular file")
        self._size = st.st_size

    def size(self) -> int:
        """Bytes."""
        return self._size

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """Sequential reads."""
        try:
            with open(self.path, "rb", buffering=0) as f:
                while chunk := f.read(chunk_bytes):
                    yield chunk
        except OSError as e:
            raise StoreUnavailable(f"reading {self.path} failed: {e.strerror}") from None


class S3Source:
    """An object in S3 (or an S3-compatible server), read with ranged GETs."""

    def __init__(self, url: str, *, client: Any = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
            raise InvalidArgument(
                f"mem object must be s3://bucket/key[?endpoint=...&region=...], got {url!r}"
            )
        if parts.username or parts.password:
            raise InvalidArgument("S3 URLs carry no credentials: use the standard AWS credential chain")
        q = dict(parse_qsl(parts.query))
        unknown = sorted(set(q) - {"endpoint", "region"})
        if unknown:
            raise InvalidArgument(f"unknown mem object option {unknown[0]!r} (endpoint, region)")
        self.bucket = parts.netloc
        self.key = parts.path.lstrip("/")
        self.description = f"s3://{self.bucket}/{self.key}"
        if client is None:
            # boto3 takes a few hundred milliseconds to import: only when an S3 source is used.
            import boto3
            from botocore.config import Config

            client = boto3.session.Session().client(
                "s3",
                endpoint_url=q.get("endpoint") or None,
                region_name=q.get("region") or None,
                config=Config(
                    retries={"mode": "standard", "max_attempts": 4}, s3={"addressing_style": "path"}
                ),
            )
        self.client = client
        self._size: int | None = None

    def _call(self, fn: Callable[[], Any]) -> Any:
        from botocore import exceptions as bexc

        try:
            return fn()
        except bexc.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise NotFound(f"{self.description} does not exist") from None
            raise StoreUnavailable(f"S3 request for {self.description} failed: {code or e}") from None
        except (bexc.BotoCoreError, OSError) as e:
            raise StoreUnavailable(f"S3 request for {self.description} failed: {e}") from None

    def size(self) -> int:
        """ContentLength from a HEAD."""
        if self._size is None:
            head = self._call(lambda: self.client.head_object(Bucket=self.bucket, Key=self.key))
            self._size = int(head["ContentLength"])
        return self._size

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """One ranged GET per chunk."""
        size = self.size()
        for start in range(0, size, chunk_bytes):
            end = min(start + chunk_bytes, size) - 1
            rng = f"bytes={start}-{end}"
            resp = self._call(
                functools.partial(self.client.get_object, Bucket=self.bucket, Key=self.key, Range=rng)
            )
            data: bytes = self._call(resp["Body"].read)
            if len(data) != end - start + 1:
                raise StoreUnavailable(
                    f"{self.description}: ranged GET {start}-{end} returned {len(data)} bytes (object changed?)"
                )
            yield data


def open_source(mem_file: str = "", mem_object: str = "") -> SnapshotSource:
    """The source named by exactly one of ``mem_file`` / ``mem_object``."""
    if bool(mem_file) == bool(mem_object):
        raise InvalidArgument(
            "give exactly one of mem_file (a path on the agent's host) or mem_object (s3://...)"
        )
    return FileSource(mem_file) if mem_file else S3Source(mem_object)


def snapshot_meta(rec: VmRecord | None) -> dict[str, Any] | None:
    """The snapshot description of a VM record, if it is a complete (restorable) import."""
    if rec is None:
        return None
    snap = rec.meta.get("snapshot")
    return snap if isinstance(snap, dict) and snap.get("state") == "ready" else None


def snapshot_space(node_id: str, rec: VmRecord) -> str:
    """The store namespace of a snapshot's pages (its node, VM id and incarnation)."""
    inc = rec.meta.get("incarnation")
    return store_space(node_id, rec.vm_id, inc) if isinstance(inc, str) and inc else rec.vm_id


def import_snapshot(
    index: PageIndex,
    store: PageStore,
    vm_id: str,
    source: SnapshotSource,
    *,
    node_id: str,
    compression: str = "none",
    prefault_pages_per_s: float = 0.0,
    prefetch_pages: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SnapshotInfo:
    """Store every non-zero page of ``source`` for ``vm_id`` and record the VM as restorable.

    AlreadyExists if the index knows ``vm_id`` (a VM or another snapshot); on any failure
    the pages written so far are purged and the VM is forgotten, then the error is raised.
    """
    validate_id(vm_id, "vm id")
    size = source.size()
    if size <= 0 or size % PAGE_SIZE:
        raise InvalidArgument(f"{source.description}: size {size} is not a positive multiple of {PAGE_SIZE}")
    if size > MAX_SNAPSHOT_BYTES:
        raise InvalidArgument(f"{source.description}: {size} bytes is more than {MAX_SNAPSHOT_BYTES}")
    if prefault_pages_per_s < 0:
        raise InvalidArgument("prefault rate must be >= 0 pages/s")
    policy = EvictionPolicy(store=store.name)
    if prefetch_pages is not None:  # how many following pages a restore fault brings in the same round trip
        if not 0 <= prefetch_pages <= EvictionPolicy.MAX_PREFETCH:
            raise InvalidArgument(f"prefetch must be between 0 and {EvictionPolicy.MAX_PREFETCH} pages")
        policy = policy.with_changes(prefetch_pages=prefetch_pages)
    if index.record(vm_id) is not None:
        raise AlreadyExists(
            f"VM {vm_id} already has pages on this node (a VM or a snapshot): detach it with purge first"
        )
    n_pages = size // PAGE_SIZE
    # Its own incarnation, so its pages live in a store namespace no other VM or agent writes to.
    incarnation = secrets.token_hex(8)
    space = store_space(node_id, vm_id, incarnation)
    snap: dict[str, Any] = {
        "state": "importing",
        "source": source.description,
        "store": store.name,
        "size": size,
    }
    meta = {"snapshot": snap, "policy": policy_to_dict(policy), "incarnation": incarnation}
    index.add_vm(VmRecord(vm_id, Backend.UFFD.value, n_pages, PAGE_SIZE, meta))
    pages = zero = stored = 0
    try:
        done = 0
        for chunk in source.chunks(CHUNK_PAGES * PAGE_SIZE):
            if len(chunk) % PAGE_SIZE:
                raise StoreUnavailable(f"{source.description}: a read returned a partial page")
            count = len(chunk) // PAGE_SIZE
            nonzero = np.frombuffer(chunk, dtype=np.uint64).reshape(count, -1).any(axis=1)
            idx = np.flatnonzero(nonzero)
            zero += count - int(idx.size)
            if idx.size:
                gen = index.next_generations(vm_id, int(idx.size))
                view = memoryview(chunk)
                blobs = [
                    PageBlob(done + int(k), gen + i, view[int(k) * PAGE_SIZE : (int(k) + 1) * PAGE_SIZE])
                    for i, k in enumerate(idx)
                ]
                entries = store.put_pages(space, blobs, compression)
                index.put_many(vm_id, store.name, entries)
                stored += sum(e.length for e in entries)
            done += count
            if progress is not None:
                progress(done, n_pages)
        if done != n_pages:
            raise StoreUnavailable(
                f"{source.description}: read {done} pages, expected {n_pages} (file changed?)"
            )
        pages = n_pages
        snap.update(
            state="ready",
            pages=pages,
            zero_pages=zero,
            stored_bytes=stored,
            imported_unix_ms=now_ms(),
            prefault_pages_per_s=prefault_pages_per_s,
        )
        index.add_vm(VmRecord(vm_id, Backend.UFFD.value, n_pages, PAGE_SIZE, meta))  # restorable from now on
        index.flush()
    except BaseException as e:
        log.error("snapshot import failed; nothing kept", vm=vm_id, source=source.description, error=str(e))
        with contextlib.suppress(TiermemError, OSError):
            store.purge_vm(space)
        index.remove_vm(vm_id)
        raise
    log.info(
        "snapshot imported", vm=vm_id, pages=pages, zero_pages=zero, stored_bytes=stored, store=store.name
    )
    return SnapshotInfo(vm_id, pages, zero, stored, store.name, source.description)
