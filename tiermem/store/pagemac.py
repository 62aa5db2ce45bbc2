"""Authenticated pages: the keyed MAC every index entry carries, and the agent's keys.

The construction (the one place it is defined; a C fault path must compute the same bytes)::

    msg = b"tiermem-page-v1\\0"               16 bytes, domain separation
        + u8(len(space)) + space              the store namespace, ASCII (see tiermem.store.space)
        + u64le(page) + u64le(generation)
        + raw page bytes                      the page as the guest had it (before compression)
    tag = u64le(BLAKE2b(msg, key=K, digest_size=16)[:8])

``K`` is 32 random bytes. ``space`` holds the node id, the VM id and the VM's
incarnation, so a page cannot be replayed into another VM, another incarnation
of the same id, another page or another generation. The 64-bit tag is kept in
the field that used to hold an xxh3-64 checksum (the index column, the segment
footers), so formats did not change; a forger without the key must guess it
online, one refused install per try (2**-64 each). In C: libsodium's
``crypto_generichash(out, 16, msg, len, K, 32)`` then the first 8 bytes, little-endian.

Keys live in a JSON keyring, ``{"current": id, "keys": {"id": "hex"}}``, created
0600 at first start in the agent's data dir, or given as a file (a mounted
secret: the same file on every node gives one key per fleet). Rotation: add a
key with a new id and make it ``current``; new pages use it, and verification
tries the current key and then every older one, so old pages stay readable
until they are faulted back or drained. Drop an old key only when no index
entry can still need it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path

from tiermem.errors import ConfigurationError

__all__ = ["DOMAIN", "KEY_BYTES", "PageKeyring", "page_mac"]

DOMAIN = b"tiermem-page-v1\0"
KEY_BYTES = 32
_HEAD = struct.Struct("<QQ")
_TAG = struct.Struct("<Q")
_PROCESS: PageKeyring | None = None


def page_mac(key: bytes, space: str, page: int, generation: int, raw: bytes | memoryview) -> int:
    """The 64-bit tag of one page (see the module docstring for the exact bytes)."""
    sp = space.encode("ascii")
    h = hashlib.blake2b(DOMAIN, key=key, digest_size=16)
    h.update(bytes((len(sp),)) + sp + _HEAD.pack(page, generation))
    h.update(raw)
    return int(_TAG.unpack_from(h.digest())[0])


class PageKeyring:
    """The MAC keys of one agent (or fleet): one current key for writing, older ones for reading."""

    def __init__(self, keys: Mapping[int, bytes], current: int) -> None:
        if current not in keys:
            raise ConfigurationError(f"page keyring: the current key {current} is not in the keyring")
        for kid, k in keys.items():
            if len(k) != KEY_BYTES:
                raise ConfigurationError(f"page keyring: key {kid} has {len(k)} bytes, not {KEY_BYTES}")
        self.current = current
        self._key = keys[current]
        self._old = [keys[k] for k in sorted(keys, reverse=True) if k != current]

    @classmethod
    def ephemeral(cls) -> PageKeyring:
        """A new random key (known to this process only)."""
        return cls({1: secrets.token_bytes(KEY_BYTES)}, 1)

    @classmethod
    def process(cls) -> PageKeyring:
        """This process's random keyring, shared by every store that was given no other (tools, tests,
        ``simulate``): pages verify when a store is reopened in the same process, and fail closed in any other."""
        global _PROCESS
        if _PROCESS is None:
            _PROCESS = cls.ephemeral()
        return _PROCESS

    @classmethod
    def load(cls, path: str | Path, create: bool = False) -> PageKeyring:
        """Read a keyring file; with ``create``, write a fresh one (0600, atomically) if it is missing."""
        p = Path(path)
        if create and not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            body = json.dumps({"current": 1, "keys": {"1": secrets.token_hex(KEY_BYTES)}}).encode()
            tmp = p.with_name(p.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, p)  # atomic: a crash never leaves half a key behind
        try:
            doc = json.loads(p.read_text())
            keys = {int(k): bytes.fromhex(v) for k, v in doc["keys"].items()}
            current = int(doc["current"])
        except FileNotFoundError:
            raise ConfigurationError(f"page key file {p} does not exist") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # never echo the file: it holds the keys
            raise ConfigurationError(
                f"page key file {p} is not a valid keyring ({type(e).__name__})"
            ) from None
        return cls(keys, current)

    def mac(self, space: str, page: int, generation: int, raw: bytes | memoryview) -> int:
        """The tag of a page written now (current key)."""
        return page_mac(self._key, space, page, generation, raw)

    def keys(self) -> list[bytes]:
        """Every key, the current one first (the order :meth:`verify` tries them; the native fault path)."""
        return [self._key, *self._old]

    def verify(self, space: str, page: int, generation: int, raw: bytes | memoryview, tag: int) -> bool:
        """True if ``tag`` authenticates the page under the current key or an older one."""
        if page_mac(self._key, space, page, generation, raw) == tag:
            return True
        return any(page_mac(k, space, page, generation, raw) == tag for k in self._old)
