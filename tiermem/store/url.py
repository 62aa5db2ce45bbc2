"""Store selection from a URL, one form per backend.

- ``file:///var/lib/tiermem/pages[?fsync=0&segment_mib=32]``: local directory (the default)
- ``memory://``: in-process (unit tests, ``tiermem simulate``)
- ``redis://[user:pass@]host[:6379][/db][?timeout=5&retries=3&prefix=tiermem&durability=none]``: Redis
- ``rediss://[user:pass@]host[:6380][/db][?ssl_ca_certs=/path/ca.pem]``: Redis over TLS
- ``s3://bucket[/prefix]?endpoint=http://host:port&region=us-east-1[&segment_mib=4]``: S3 or an
  S3-compatible server (credentials from the standard AWS chain)

Options are parsed by :mod:`tiermem.store.options` (strict types and booleans, unknown or
repeated options refused). An invalid URL raises ConfigurationError with one line naming what is wrong,
and never echoes a password. Backend modules are imported only when used
(boto3 alone takes a few hundred milliseconds to import).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from tiermem.errors import ConfigurationError, TiermemError
from tiermem.logging import redact_text
from tiermem.store.base import PageStore
from tiermem.store.options import Opt, parse_options
from tiermem.store.payload import check_page_size

__all__ = ["SCHEMES", "open_store", "redact_url"]

SCHEMES = ("file", "memory", "redis", "rediss", "s3")
_FILE_OPTIONS = {"fsync": Opt("bool", True), "segment_mib": Opt("float", 32.0, 1, 1024)}


def redact_url(url: str) -> str:
    """``url`` with its password (and secret-looking query values) replaced by ``***``."""
    return redact_text(url)


def _open_file(url: str, parts: Any, name: str, page_size: int, opts: dict[str, Any]) -> PageStore:
    from tiermem.store.local import LocalPageStore

    if parts.netloc not in ("", "localhost"):
        raise ConfigurationError(
            f"file store URL {url} names host {parts.netloc!r}: use file:///absolute/path"
        )
    path = unquote(parts.path)
    if not path.startswith("/") or path == "/":
        raise ConfigurationError(
            f"file store URL {url} needs an absolute directory: file:///var/lib/tiermem/pages"
        )
    q = parse_options("file", parts.query, opts, _FILE_OPTIONS, url)
    return LocalPageStore(
        path,
        fsync=q["fsync"],
        name=name,
        page_size=page_size,
        segment_bytes=int(q["segment_mib"] * (1 << 20)),
    )


def open_store(url: str, name: str = "default", page_size: int = 4096, **opts: Any) -> PageStore:
    """Open the page store that ``url`` names; ``opts`` add to (and override) the URL's query options."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("empty store URL: use file://, memory://, redis://, rediss:// or s3://")
    check_page_size(page_size)
    safe = redact_url(url)
    try:
        parts = urlsplit(url.strip())
    except ValueError as e:
        raise ConfigurationError(f"malformed store URL {safe}: {e}") from None
    scheme = parts.scheme.lower()
    try:
        if scheme == "file":
            return _open_file(safe, parts, name, page_size, opts)
        if scheme == "memory":
            from tiermem.store.memory import MemoryPageStore

            if parts.query or parts.path.strip("/") or opts:
                raise ConfigurationError(
                    f"memory store URL {safe} takes no path or options (memory://[name])"
                )
            return MemoryPageStore(name, page_size=page_size)
        if scheme in ("redis", "rediss"):
            from tiermem.store.redis_store import RedisPageStore

            return RedisPageStore.from_url(url.strip(), name=name, page_size=page_size, **opts)
        if scheme == "s3":
            from tiermem.store.s3_store import S3PageStore

            return S3PageStore.from_url(url.strip(), name=name, page_size=page_size, **opts)
    except TiermemError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigurationError(f"invalid store URL {safe}: {e}") from None
    shown = f"{scheme!r}" if scheme else "no scheme"
    raise ConfigurationError(
        f"unsupported store URL {safe} ({shown}): use file://, memory://, redis://, rediss:// or s3://"
    )
