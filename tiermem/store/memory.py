"""``MemoryPageStore``: an in-process store for unit tests and ``tiermem simulate``.

Nothing survives the process. Fault hooks let agent tests make the next puts
or gets fail with StoreUnavailable, or make puts raise StoreFull, exactly as a
real backend would after its own retries.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from tiermem.errors import NotFound, StoreFull, StoreUnavailable
from tiermem.store.base import StoredPage
from tiermem.store.payload import EncodedPage, PayloadStore

__all__ = ["MemoryPageStore"]


class MemoryPageStore(PayloadStore):
    """Payloads in a dict keyed by (vm, page, generation). Thread-safe."""

    kind = "memory"

    def __init__(self, name: str = "default", page_size: int = 4096) -> None:
        super().__init__(name, page_size)
        self._lock = threading.Lock()
        self._data: dict[str, dict[tuple[int, int], bytes]] = {}
        self._fail_puts = 0
        self._fail_gets = 0
        self._full = False
        self.calls = {"put": 0, "get": 0, "delete": 0}
        """Backend round trips made (zero pages never count), for tests."""

    @property
    def url(self) -> str:
        """``memory://<name>``."""
        return f"memory://{self.name}"

    # -- fault injection -------------------------------------------------------------

    def fail_next_puts(self, n: int = 1) -> None:
        """Make the next ``n`` backend puts raise StoreUnavailable (nothing is stored)."""
        with self._lock:
            self._fail_puts = n

    def fail_next_gets(self, n: int = 1) -> None:
        """Make the next ``n`` backend gets raise StoreUnavailable."""
        with self._lock:
            self._fail_gets = n

    def set_full(self, full: bool = True) -> None:
        """While set, every backend put raises StoreFull."""
        with self._lock:
            self._full = full

    def corrupt(self, vm_id: str, page: int, generation: int, offset: int = 0) -> None:
        """Flip one bit of a stored payload (to test verification)."""
        with self._lock:
            payload = bytearray(self._data[vm_id][(page, generation)])
            payload[offset % len(payload)] ^= 0x01
            self._data[vm_id][(page, generation)] = bytes(payload)

    # -- backend hooks -----------------------------------------------------------------

    def _put_payloads(self, vm_id: str, items: Sequence[EncodedPage]) -> list[str]:
        with self._lock:
            self.calls["put"] += 1
            if self._full:
                raise StoreFull(f"memory store {self.name!r} is full (fault injection)")
            if self._fail_puts > 0:
                self._fail_puts -= 1
                raise StoreUnavailable(f"memory store {self.name!r}: put failed (fault injection)")
            vm = self._data.setdefault(vm_id, {})
            for it in items:
                vm[(it.page, it.generation)] = it.payload
        return [f"{vm_id}/{it.page}/{it.generation}" for it in items]

    def _get_payloads(self, vm_id: str, entries: Sequence[StoredPage]) -> list[bytes]:
        with self._lock:
            self.calls["get"] += 1
            if self._fail_gets > 0:
                self._fail_gets -= 1
                raise StoreUnavailable(f"memory store {self.name!r}: get failed (fault injection)")
            vm = self._data.get(vm_id, {})
            out = []
            for e in entries:
                payload = vm.get((e.page, e.generation))
                if payload is None:
                    raise NotFound(f"VM {vm_id} page {e.page} generation {e.generation} is not in {self.url}")
                out.append(payload)
            return out

    def _delete_payloads(self, vm_id: str, entries: Sequence[StoredPage]) -> None:
        with self._lock:
            self.calls["delete"] += 1
            vm = self._data.get(vm_id, {})
            for e in entries:
                vm.pop((e.page, e.generation), None)

    def _purge(self, vm_id: str) -> int:
        with self._lock:
            return len(self._data.pop(vm_id, {}))

    def _payload_usage(self, vm_id: str | None) -> tuple[int, int]:
        with self._lock:
            vms = [self._data.get(vm_id, {})] if vm_id is not None else list(self._data.values())
            return sum(len(v) for v in vms), sum(len(p) for v in vms for p in v.values())
