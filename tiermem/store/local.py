"""``LocalPageStore``: the embedded default store, a directory on local disk.

On-disk layout under ``root`` (the segment and tombstone formats are in
:mod:`tiermem.store.segments`)::

    .lock                 flock held by the one process that owns this root
    <vm>/seg/<id>         segment files: one record appended per put batch, up to segment_bytes
    <vm>/del/<id>         tombstone files (deletes in segments that stay)
    <vm>/del/<id>.tmp     a tombstone being written; leftovers are removed at open
    .purge-<vm>-<rand>    a VM directory being purged; leftovers are removed at open

Durability: ``put_pages`` appends one record to the VM's active segment file
with ``pwrite`` and returns after ``fdatasync`` (and, when the file is new, an
fsync of its directory), so a put costs what a plain pwrite + fdatasync costs.
With ``fsync=False`` the data reaches the page cache only: fast, but a host
crash can lose pages that were already punched. A torn append can only leave
an incomplete last record, which no index entry points to; a restarted
process never appends to an existing file. Tombstones are written to
``<id>.tmp`` and renamed.

Concurrency: appends to a VM's active file are serialized by the engine;
bytes once written never change, so readers never see a partial record; the
map is guarded per VM, and read descriptors are shared through a
reference-counted cache so that deleting a segment never closes a descriptor
another thread is reading from. One process owns a root at a time (``flock``
on ``.lock``): a second opener gets ConfigurationError.

Restart: a new process rebuilds each VM's map from segment footers on first
use, so the StoredPage entries in the agent's index keep resolving.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from tiermem.errors import (
    ConfigurationError,
    IntegrityError,
    NotFound,
    StoreFull,
    StoreUnavailable,
    TiermemError,
)
from tiermem.fsmodes import private_dir
from tiermem.store.segments import SegmentStore
from tiermem.store.space import validate_space

__all__ = ["LocalPageStore", "os_error"]

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_CONFIG = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ELOOP,
    errno.ENAMETOOLONG,
}


def os_error(e: OSError, what: str) -> TiermemError:
    """Translate an OSError from the local store into the tiermem tree."""
    msg = f"{what}: {e.strerror or e}"
    if e.errno in _FULL:
        return StoreFull(msg)
    if e.errno in _CONFIG:
        return ConfigurationError(msg)
    if e.errno == errno.ENOENT:
        return NotFound(msg)
    return StoreUnavailable(msg)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Fd:
    __slots__ = ("closing", "fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 0
        self.closing = False


class _FdCache:
    """Open read-only descriptors by path, closed only when no reader holds them."""

    def __init__(self, limit: int = 256) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Fd] = OrderedDict()
        self._limit = limit

    def acquire(self, path: str) -> _Fd:
        """A descriptor for ``path``, held until :meth:`release` (opens it if needed)."""
        with self._lock:
            ent = self._open.get(path)
            if ent is None:
                ent = self._open[path] = _Fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                while len(self._open) > self._limit:
                    _, old = self._open.popitem(last=False)
                    self._retire(old)
            else:
                self._open.move_to_end(path)
            ent.refs += 1
            return ent

    def release(self, ent: _Fd) -> None:
        """Drop a hold; a descriptor forgotten meanwhile is closed by its last holder."""
        with self._lock:
            ent.refs -= 1
            if ent.closing and ent.refs == 0:
                os.close(ent.fd)

    def _retire(self, ent: _Fd) -> None:
        if ent.refs == 0:
            os.close(ent.fd)
        else:
            ent.closing = True

    def forget(self, prefix: str) -> None:
        """Close (or mark for closing) every descriptor whose path starts with ``prefix``."""
        with self._lock:
            for path in [p for p in self._open if p.startswith(prefix)]:
                self._retire(self._open.pop(path))


class LocalPageStore(SegmentStore):
    """Pages in segment files under ``root``, one directory per VM.

    ``segment_bytes`` (default 32 MiB) bounds a segment file: large enough that
    a 1024-page batch appends to an existing file rather than creating one (a
    new file costs a directory fsync), small enough that compacting a file
    that fell below ``compact_below`` live rewrites a bounded amount.
    """

    kind = "file"
    appendable = True

    def __init__(
        self,
        root: Path | str,
        fsync: bool = True,
        name: str = "default",
        page_size: int = 4096,
        *,
        segment_bytes: int = 32 << 20,
        compact_below: float = 0.5,
    ) -> None:
        super().__init__(
            name, page_size, segment_bytes=segment_bytes, compact_below=compact_below, max_gap=16 << 10
        )
        self.root = Path(root).resolve()
        self._root = str(self.root)
        self.fsync = fsync
        self._fds = _FdCache()
        self._dirs_lock = threading.Lock()
        self._dirs: set[Path] = set()
        try:
            private_dir(self.root)
            self._lock_fd: int | None = os.open(
                self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise ConfigurationError(f"cannot use {self.root} as a page store: {e.strerror or e}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise ConfigurationError(
                f"page store {self.root} is already open in another store or process"
            ) from None
        self._cleanup()

    @property
    def url(self) -> str:
        """``file://<root>`` (plus ``?fsync=0`` when fsync is off)."""
        return f"file://{self.root}" + ("" if self.fsync else "?fsync=0")

    def segment_dir(self, space: str) -> str:
        """The directory of a VM namespace's segment files (entry locations ``seg/<name>@...`` are
        relative to its parent); the native fault path reads payloads there."""
        return f"{self._root}/{validate_space(space)}/seg"

    def close(self) -> None:
        """Close descriptors and release the root's lock."""
        super().close()
        self._fds.forget("")
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _cleanup(self) -> None:
        """Remove what an interrupted write or purge left behind."""
        for p in self.root.glob(".purge-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob("*/*/*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()

    def _dir(self, vm_id: str, kind: str, create: bool = False) -> Path:
        d = self.root / vm_id / kind
        if create and d not in self._dirs:
            with self._dirs_lock:
                for p, parent in ((d.parent, self.root), (d, d.parent)):
                    if not p.is_dir():
                        p.mkdir(exist_ok=True, mode=0o700)
                        if self.fsync:
                            _fsync_dir(parent)
                self._dirs.add(d)
        return d

    # -- blob hooks -------------------------------------------------------------------

    def _blob_put(self, vm_id: str, kind: str, name: str, data: bytes) -> None:
        tmp: Path | None = None
        try:
            d = self._dir(vm_id, kind, create=True)
            tmp = d / f"{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, d / name)
            if self.fsync:
                _fsync_dir(d)
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise os_error(e, f"writing {kind} {name} of VM {vm_id} in {self.root}") from None

    def _blob_append(self, vm_id: str, name: str, offset: int, data: bytes, create: bool) -> None:
        try:
            d = self._dir(vm_id, "seg", create=True)
            flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
            fd = os.open(f"{d}/{name}", flags, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
                if self.fsync:
                    os.fdatasync(fd)  # covers the new file size, which reading the data needs
            finally:
                os.close(fd)
            if create and self.fsync:
                _fsync_dir(d)
        except OSError as e:
            raise os_error(e, f"appending to segment {name} of VM {vm_id} in {self.root}") from None

    def _blob_read(self, vm_id: str, kind: str, name: str, start: int, end: int) -> bytes:
        path = f"{self._root}/{vm_id}/{kind}/{name}"  # str, not Path: this is the fault path
        try:
            ent = self._fds.acquire(path)
            try:
                data = os.pread(ent.fd, end - start, start)
            finally:
                self._fds.release(ent)
        except OSError as e:
            raise os_error(e, f"reading {kind} {name} of VM {vm_id} in {self.root}") from None
        if len(data) != end - start:
            raise IntegrityError(f"{kind} {name} of VM {vm_id} is truncated: wanted bytes {start}-{end}")
        return data

    def _blob_get(self, vm_id: str, kind: str, name: str) -> bytes:
        try:
            return (self.root / vm_id / kind / name).read_bytes()
        except OSError as e:
            raise os_error(e, f"reading {kind} {name} of VM {vm_id} in {self.root}") from None

    def _blob_delete(self, vm_id: str, kind: str, names: Sequence[str]) -> None:
        d = self.root / vm_id / kind
        for name in names:
            path = d / name
            self._fds.forget(str(path))
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise os_error(e, f"deleting {kind} {name} of VM {vm_id} in {self.root}") from None

    def _blob_list(self, vm_id: str, kind: str) -> list[tuple[str, int]]:
        try:
            with os.scandir(self.root / vm_id / kind) as it:
                return [(e.name, e.stat().st_size) for e in it if e.is_file() and not e.name.endswith(".tmp")]
        except FileNotFoundError:
            return []
        except OSError as e:
            raise os_error(e, f"listing VM {vm_id} in {self.root}") from None

    def _blob_vms(self) -> list[str]:
        out = []
        with os.scandir(self.root) as it:
            for e in it:
                if e.is_dir() and not e.name.startswith("."):
                    with contextlib.suppress(TiermemError):
                        out.append(validate_space(e.name))
        return sorted(out)

    def _blob_purge(self, vm_id: str) -> None:
        vm_dir = self.root / vm_id
        self._fds.forget(f"{vm_dir}/")
        with self._dirs_lock:
            self._dirs = {d for d in self._dirs if d.parent != vm_dir}
        doomed = self.root / f".purge-{vm_id}-{os.urandom(4).hex()}"
        try:
            os.rename(vm_dir, doomed)  # atomic: the VM's namespace is gone at once
        except FileNotFoundError:
            return
        except OSError as e:
            raise os_error(e, f"purging VM {vm_id} in {self.root}") from None
        if self.fsync:
            _fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)
