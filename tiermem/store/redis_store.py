"""``RedisPageStore``: pages as binary Redis strings (redis-py).

Key layout (the hash tag ``{<vm>}`` puts all of one VM's keys in one Redis
Cluster slot, so a batch is a single-slot operation)::

    <prefix>:{<vm>}:p:<page>:<generation>   the payload
    <prefix>:{<vm>}:usage                   hash: pages, bytes

A put batch is one ``EVALSHA`` of a small Lua script that SETs every key and
adjusts the usage hash by the *actual* delta (``STRLEN`` before each SET), so:

- it is all-or-nothing like MULTI/EXEC (a script runs atomically, and Redis
  refuses a writing script under maxmemory before its first write), and
- unlike MULTI/EXEC it stays exact when a batch is retried after a lost reply
  (redis-py's Retry re-sends it): overwriting a key never counts it twice.

Deletes use the same pattern. Reads are one MGET. Purge walks the VM's keys
with SCAN MATCH and UNLINKs them in batches, never KEYS or a blocking DEL.

Connections: redis-py's ConnectionPool (thread-safe), socket timeouts, and
``Retry(ExponentialBackoff(), retries)`` on ConnectionError/TimeoutError. The
password is never part of ``url``, logs or error messages.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import structlog
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tiermem.errors import ConfigurationError, NotFound, StoreFull, StoreUnavailable, TiermemError
from tiermem.logging import redact_text
from tiermem.store.base import StoredPage
from tiermem.store.options import Opt, parse_options
from tiermem.store.payload import EncodedPage, PayloadStore

__all__ = ["RedisEndpoint", "RedisPageStore", "redis_error"]

log = structlog.get_logger("tiermem.store.redis")

_PUT = """
local dp, db = 0, 0
for i = 2, #KEYS do
  local old = redis.call('STRLEN', KEYS[i])
  if old > 0 then dp = dp - 1; db = db - old end
  redis.call('SET', KEYS[i], ARGV[i - 1])
  dp = dp + 1; db = db + #ARGV[i - 1]
end
redis.call('HINCRBY', KEYS[1], 'pages', dp)
redis.call('HINCRBY', KEYS[1], 'bytes', db)
return dp
"""

_DELETE = """
local dp, db = 0, 0
for i = 2, #KEYS do
  local old = redis.call('STRLEN', KEYS[i])
  if old > 0 then
    redis.call('UNLINK', KEYS[i])
    dp = dp + 1; db = db + old
  end
end
if dp > 0 then
  redis.call('HINCRBY', KEYS[1], 'pages', -dp)
  redis.call('HINCRBY', KEYS[1], 'bytes', -db)
end
return dp
"""

_SCAN_COUNT = 1000
_OOM = re.compile(r"\bOOM\b")
_OPTIONS = {
    "timeout": Opt("float", 5.0, 0.001, 3600),
    "connect_timeout": Opt("float", 2.0, 0.001, 600),
    "retries": Opt("int", 3, 0, 100),
    "prefix": Opt("str", "tiermem"),
    "max_connections": Opt("int", None, 1, 1 << 20),
    "health_check_interval": Opt("int", 30, 0, 86400),
    "durability": Opt("choice", "required", choices=("required", "none")),
    "ssl_ca_certs": Opt("str"),
    "ssl_certfile": Opt("str"),
    "ssl_keyfile": Opt("str"),
    "ssl_cert_reqs": Opt("choice", None, choices=("required", "optional", "none")),
    "ssl_check_hostname": Opt("bool"),
}


def redis_error(e: Exception, what: str) -> TiermemError:
    """Translate a redis-py error into the tiermem tree, most specific first."""
    msg = f"{what}: {type(e).__name__}: {e}"
    if isinstance(e, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError):
        return ConfigurationError(f"{what}: Redis rejected the credentials ({e})")
    if isinstance(e, redis.exceptions.NoPermissionError):
        return ConfigurationError(f"{what}: the Redis user lacks a permission ({e})")
    if isinstance(e, redis.exceptions.OutOfMemoryError) or _OOM.search(str(e)):
        return StoreFull(f"{what}: Redis is out of memory (maxmemory reached)")
    if isinstance(
        e, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | TimeoutError | OSError
    ):
        return StoreUnavailable(msg)  # BusyLoading and MaxConnections are ConnectionErrors too
    if isinstance(e, redis.exceptions.ReadOnlyError | redis.exceptions.TryAgainError):
        return StoreUnavailable(msg)
    if isinstance(e, redis.exceptions.ClusterDownError | redis.exceptions.MasterDownError):
        return StoreUnavailable(msg)
    if isinstance(e, redis.exceptions.ResponseError) and str(e).startswith(("NOAUTH", "WRONGPASS")):
        return ConfigurationError(f"{what}: Redis requires other credentials ({e})")
    if isinstance(e, redis.exceptions.ResponseError) and "DB index is out of range" in str(e):
        return ConfigurationError(f"{what}: the Redis database number does not exist")
    return StoreUnavailable(msg)


@dataclass(frozen=True)
class RedisEndpoint:
    """How to reach this store's Redis without redis-py (the native fault path's own connection)."""

    host: str | None
    port: int
    unix_path: str | None
    username: str | None
    password: str | None = field(repr=False)
    db: int
    timeout_s: float
    connect_timeout_s: float


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisPageStore(PayloadStore):
    """Pages in Redis (standalone, or a Cluster-compatible key layout)."""

    kind = "redis"

    def __init__(
        self,
        client: redis.Redis,
        url: str,
        name: str = "default",
        page_size: int = 4096,
        prefix: str = "tiermem",
        durable: bool = True,
    ) -> None:
        super().__init__(name, page_size)
        self.client = client
        self.prefix = prefix
        self._url = url
        self.durable = durable
        """True: puts are refused until Redis is seen to persist (AOF or RDB saves)."""
        self._persistence_ok = not durable
        if not durable:
            log.warning(
                "REDIS STORE WITHOUT DURABILITY: evicted pages are lost if Redis restarts "
                "(durability=none in the store URL)",
                store=name,
                url=url,
            )
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)

    @classmethod
    def from_url(cls, url: str, name: str = "default", page_size: int = 4096, **opts: Any) -> RedisPageStore:
        """Open ``redis://[user:pass@]host[:port][/db][?options]`` or ``rediss://…`` (TLS).

        Options: ``timeout`` (socket, seconds, default 5), ``connect_timeout``
        (default 2), ``retries`` (default 3), ``prefix`` (default ``tiermem``),
        ``max_connections``, ``health_check_interval``, and for TLS
        ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
        ``ssl_cert_reqs`` (required|optional|none), ``ssl_check_hostname`` (0|1).
        """
        safe = redact_text(url)
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"not a Redis URL: {safe}")
        q = parse_options("Redis", parts.query, opts, _OPTIONS, safe)
        try:
            host, port = parts.hostname, parts.port or 6379
        except ValueError:
            raise ConfigurationError(f"invalid port in Redis URL {safe}") from None
        if not host:
            raise ConfigurationError(f"Redis URL {safe} has no host")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ConfigurationError(f"Redis URL {safe}: the path must be a database number, not {path!r}")
        kw: dict[str, Any] = {
            "host": host,
            "port": port,
            "db": int(path or 0),
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None,
            "socket_timeout": q["timeout"],
            "socket_connect_timeout": q["connect_timeout"],
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), q["retries"]),
            "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
            "health_check_interval": q["health_check_interval"],
            "decode_responses": False,
            "client_name": f"tiermem-{name}",
        }
        if "max_connections" in q:
            kw["max_connections"] = q["max_connections"]
        prefix = q["prefix"]
        if not prefix or any(c in prefix for c in "{}*?[] "):
            raise ConfigurationError(
                f"Redis store prefix {prefix!r} may not be empty or contain {{}}*?[] or spaces"
            )
        ssl_opts = {k: v for k, v in q.items() if k.startswith("ssl_")}
        if parts.scheme == "rediss":
            kw["ssl"] = True
            for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
                if k in ssl_opts:
                    kw[k] = ssl_opts[k]
            reqs = ssl_opts.get("ssl_cert_reqs", "required")
            kw["ssl_cert_reqs"] = reqs
            check = ssl_opts.get("ssl_check_hostname", reqs == "required")
            if check and reqs == "none":
                raise ConfigurationError(
                    "ssl_check_hostname needs certificate checking: not with ssl_cert_reqs=none"
                )
            kw["ssl_check_hostname"] = check
        elif ssl_opts:
            raise ConfigurationError(f"TLS options need a rediss:// URL: {safe}")
        durable = q["durability"] == "required"
        return cls(redis.Redis(**kw), safe, name=name, page_size=page_size, prefix=prefix, durable=durable)

    @property
    def url(self) -> str:
        """The store URL, password redacted."""
        return self._url

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.exceptions.RedisError as e:
            raise redis_error(e, f"{what} on {self._url}") from None
        except OSError as e:
            raise redis_error(e, f"{what} on {self._url}") from None

    def key(self, vm_id: str, page: int, generation: int) -> str:
        """The Redis key of one page (deterministic: invariant 5 never trusts a location)."""
        return f"{self.key_prefix(vm_id)}{page}:{generation}"

    def key_prefix(self, vm_id: str) -> str:
        """What every page key of ``vm_id`` starts with: the key is ``<key_prefix><page>:<generation>``."""
        return f"{self.prefix}:{{{vm_id}}}:p:"

    def endpoint(self) -> RedisEndpoint | None:
        """The plain (TCP or unix socket) endpoint and credentials; None for TLS (rediss://), which only
        redis-py speaks here."""
        pool = self.client.connection_pool
        if issubclass(pool.connection_class, redis.SSLConnection):
            return None
        kw = pool.connection_kwargs
        unix = kw.get("path") if issubclass(pool.connection_class, redis.UnixDomainSocketConnection) else None
        return RedisEndpoint(
            host=None if unix else str(kw.get("host", "localhost")),
            port=int(kw.get("port", 6379)),
            unix_path=str(unix) if unix else None,
            username=kw.get("username"),
            password=kw.get("password"),
            db=int(kw.get("db", 0)),
            timeout_s=float(kw.get("socket_timeout") or 5.0),
            connect_timeout_s=float(kw.get("socket_connect_timeout") or kw.get("socket_timeout") or 2.0),
        )

    def _usage_key(self, vm_id: str) -> str:
        return f"{self.prefix}:{{{vm_id}}}:usage"

    # -- backend hooks ------------------------------------------------------------------

    def check_persistence(self) -> str:
        """Describe how Redis persists; ConfigurationError if it does not and durability is required.

        An acknowledged page is punched from the guest, so a Redis that keeps it only in memory
        loses the guest's only copy when it restarts: we refuse to evict into one unless the
        operator said ``durability=none``. Checked before the first put, and again after a failure.
        """
        with self._translate("checking persistence"):
            try:
                cfg: dict[Any, Any] = dict(self.client.config_get("appendonly"))
                cfg.update(self.client.config_get("save"))
                got = {_text(k): _text(v) for k, v in cfg.items()}
                aof = got.get("appendonly", "") == "yes"
                save = got.get("save", "").strip()
            except redis.exceptions.NoPermissionError:
                try:
                    info = self.client.info("persistence")  # CONFIG may be denied by ACL; INFO shows AOF
                except redis.exceptions.NoPermissionError:
                    raise ConfigurationError(
                        f"cannot check that Redis at {self._url} persists: the user may run neither CONFIG GET "
                        "nor INFO; grant +info (or add durability=none to the store URL)"
                    ) from None
                aof, save = bool(int(info.get("aof_enabled", 0))), ""
        how = "appendonly" if aof else (f"RDB save {save!r}" if save else "none")
        if how == "none" and self.durable:
            raise ConfigurationError(
                f"Redis at {self._url} does not persist (appendonly no, no RDB save rule, or CONFIG GET denied): "
                "evicted pages would be lost on a Redis restart; enable appendonly, or add durability=none "
                "to the store URL to accept that"
            )
        return how

    def _put_payloads(self, vm_id: str, items: Sequence[EncodedPage]) -> list[str]:
        if not self._persistence_ok:
            self.check_persistence()
            self._persistence_ok = True
        keys = [self.key(vm_id, it.page, it.generation) for it in items]
        with self._translate(f"put of {len(items)} pages of VM {vm_id}"):
            self._put(keys=[self._usage_key(vm_id), *keys], args=[it.payload for it in items])
        return keys

    def _get_payloads(self, vm_id: str, entries: Sequence[StoredPage]) -> list[bytes]:
        keys = [self.key(vm_id, e.page, e.generation) for e in entries]
        with self._translate(f"get of {len(keys)} pages of VM {vm_id}"):
            values: list[Any] = [self.client.get(keys[0])] if len(keys) == 1 else list(self.client.mget(keys))
        out: list[bytes] = []
        for e, v in zip(entries, values, strict=True):
            if v is None:
                raise NotFound(f"VM {vm_id} page {e.page} generation {e.generation} is not in {self._url}")
            out.append(bytes(v))
        return out

    def _delete_payloads(self, vm_id: str, entries: Sequence[StoredPage]) -> None:
        keys = [self.key(vm_id, e.page, e.generation) for e in entries]
        with self._translate(f"delete of {len(keys)} pages of VM {vm_id}"):
            self._delete(keys=[self._usage_key(vm_id), *keys], args=[])

    def _purge(self, vm_id: str) -> int:
        removed = 0
        with self._translate(f"purge of VM {vm_id}"):
            batch: list[bytes] = []
            for k in self.client.scan_iter(match=f"{self.prefix}:{{{vm_id}}}:p:*", count=_SCAN_COUNT):
                batch.append(k)
                if len(batch) >= _SCAN_COUNT:
                    removed += int(self.client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(self.client.unlink(*batch))
            self.client.unlink(self._usage_key(vm_id))
        return removed

    def _payload_usage(self, vm_id: str | None) -> tuple[int, int]:
        with self._translate("usage"):
            if vm_id is not None:
                keys = [self._usage_key(vm_id)]
            else:
                keys = list(self.client.scan_iter(match=f"{self.prefix}:{{*}}:usage", count=_SCAN_COUNT))
            pages = stored = 0
            for k in keys:
                p, b = self.client.hmget(k, ["pages", "bytes"])
                pages += int(p or 0)
                stored += int(b or 0)
        return pages, stored
