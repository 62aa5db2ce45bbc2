"""Redis state store: shared by several control-plane replicas.

Layout under a key prefix (``?prefix=`` in the URL, default ``tiermem:cp:``):
hashes for nodes, VMs, statuses, policies, adjustments and marks; a list of
reports per VM plus a bounded list of all reports; the event log as a sorted
set scored by sequence number (members ``"<seq>|<json>"``); ``order:<id>`` claim
keys with an expiry; and the ``leader`` lease key (``"<replica>|<address>"``).
Multi-key updates run as Lua scripts or MULTI pipelines, so each method is
atomic. Redis errors become :class:`tiermem.errors.Unavailable`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tiermem.api import Adjustment, LeaderInfo, NodeInfo, PolicyEntry, VmSpec
from tiermem.control.clock import Clock, clock_ms
from tiermem.control.codec import dumps, loads
from tiermem.control.state import DEFAULT_EVENTS_KEEP, DEFAULT_REPORTS_KEEP, StateStore
from tiermem.errors import ConfigurationError, Unavailable
from tiermem.model import CycleReport, Event, VmStatus

__all__ = ["RedisState"]

_NO_POLICY = frozenset({"policy"})

# KEYS[1] seq counter, KEYS[2] log zset; ARGV[1] json, ARGV[2] keep
_APPEND_EVENT = """
local seq = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], seq, seq .. '|' .. ARGV[1])
if seq % 100 == 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', seq - tonumber(ARGV[2])) end
return seq
"""
# KEYS: vms, vm_node; ARGV: vm id, spec json, node id.
_CREATE_VM = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""
# KEYS: vms, status, adjust, policies, reports:<vm>, reports_all, vm_node; ARGV[1] vm id.
_DELETE_VM = """
local found = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], 'vm:' .. ARGV[1])
for _, doc in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do redis.call('LREM', KEYS[6], 0, doc) end
redis.call('DEL', KEYS[5])
return found
"""
# KEYS[1] lease; ARGV[1] replica, ARGV[2] value, ARGV[3] ttl ms. Take if free, renew if ours.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
local sep = string.find(cur, '|', 1, true)
local owner = sep and string.sub(cur, 1, sep - 1) or cur
if owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# KEYS[1] lease; ARGV[1] replica. Delete only if ours (compare-and-delete).
_RELEASE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, '|', 1, true)
  local owner = sep and string.sub(cur, 1, sep - 1) or cur
  if owner == ARGV[1] then return redis.call('DEL', KEYS[1]) end
end
return 0
"""


def _split_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.pop("prefix", "tiermem:cp:")
    if prefix and not prefix.endswith(":"):
        prefix += ":"
    return urlunsplit(parts._replace(query=urlencode(query))), prefix


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class RedisState(StateStore):
    """The shared state store."""

    shared = True

    def __init__(
        self,
        url: str,
        clock: Clock | None = None,
        reports_keep: int = DEFAULT_REPORTS_KEEP,
        events_keep: int = DEFAULT_EVENTS_KEEP,
    ) -> None:
        super().__init__(clock, reports_keep, events_keep)
        self._url = url
        self._client_url, self.prefix = _split_url(url)
        self._r: aioredis.Redis | None = None
        self.all_reports_keep = 10 * self.reports_keep

    @property
    def url(self) -> str:
        """The Redis URL, password redacted."""
        return _redact(self._url)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def open(self) -> None:
        """Connect and check the server answers."""
        try:
            self._r = aioredis.Redis.from_url(
                self._client_url, socket_timeout=5.0, socket_connect_timeout=5.0, health_check_interval=30
            )
        except ValueError as e:
            raise ConfigurationError(f"invalid Redis URL {self.url!r}: {e}") from None
        async with self._guard():
            await self.r.ping()

    async def close(self) -> None:
        """Close the connection pool."""
        if self._r is not None:
            await self._r.aclose()
            self._r = None

    @property
    def r(self) -> aioredis.Redis:
        """The client (raises Unavailable before open)."""
        if self._r is None:
            raise Unavailable("state store is not open")
        return self._r

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except RedisError as e:
            raise Unavailable(f"state store {self.url} unavailable: {e}") from None
        except OSError as e:
            raise Unavailable(f"state store {self.url} unavailable: {e}") from None

    async def _hget(self, key: str, field: str) -> bytes | None:
        async with self._guard():
            v: Any = await self.r.hget(key, field)
            return cast("bytes | None", v)

    async def _hvals(self, key: str) -> list[bytes]:
        async with self._guard():
            v: Any = await self.r.hvals(key)
            return cast("list[bytes]", v)

    async def _hdel(self, key: str, field: str) -> bool:
        async with self._guard():
            n: Any = await self.r.hdel(key, field)
            return bool(n)

    async def _hset(self, key: str, field: str, value: str) -> None:
        async with self._guard():
            await self.r.hset(key, field, value)

    # -- nodes
    async def put_node(self, node: NodeInfo) -> None:
        """Create or replace a node."""
        await self._hset(self._k("nodes"), node.node_id, dumps(node))

    async def get_node(self, node_id: str) -> NodeInfo | None:
        """A node, or None."""
        v = await self._hget(self._k("nodes"), node_id)
        return loads(NodeInfo, v) if v else None

    async def delete_node(self, node_id: str) -> bool:
        """Remove a node."""
        return await self._hdel(self._k("nodes"), node_id)

    async def list_nodes(self) -> list[NodeInfo]:
        """Every node, sorted by id."""
        return sorted(
            (loads(NodeInfo, v) for v in await self._hvals(self._k("nodes"))), key=lambda n: n.node_id
        )

    # -- VMs
    async def create_vm(self, spec: VmSpec) -> bool:
        """Register a VM unless the id is taken (HSETNX; the VM's node goes to a second hash)."""
        async with self._guard():
            created: Any = await self.r.eval(
                _CREATE_VM, 2, self._k("vms"), self._k("vm_node"), spec.vm_id, dumps(spec), spec.node_id
            )
            return bool(created)

    async def get_vm(self, vm_id: str) -> VmSpec | None:
        """A VM, or None."""
        v = await self._hget(self._k("vms"), vm_id)
        return loads(VmSpec, v) if v else None

    async def get_vms(self, vm_ids: Sequence[str]) -> dict[str, VmSpec]:
        """The known VMs among ``vm_ids`` (one HMGET)."""
        ids = list(dict.fromkeys(vm_ids))
        if not ids:
            return {}
        async with self._guard():
            raw: Any = await self.r.hmget(self._k("vms"), ids)
        return {vm_id: loads(VmSpec, v) for vm_id, v in zip(ids, raw, strict=True) if v}

    async def vm_nodes(self, vm_ids: Sequence[str]) -> dict[str, str]:
        """The node of each known VM among ``vm_ids`` (one HMGET)."""
        ids = list(dict.fromkeys(vm_ids))
        if not ids:
            return {}
        async with self._guard():
            raw: Any = await self.r.hmget(self._k("vm_node"), ids)
        return {vm_id: v.decode() for vm_id, v in zip(ids, raw, strict=True) if v}

    async def delete_vm(self, vm_id: str) -> bool:
        """Remove a VM and everything kept for it (one MULTI)."""
        async with self._guard():
            found = await self.r.eval(
                _DELETE_VM,
                7,
                self._k("vms"),
                self._k("status"),
                self._k("adjust"),
                self._k("policies"),
                self._k("reports", vm_id),
                self._k("reports_all"),
                self._k("vm_node"),
                vm_id,
            )
            return bool(found)

    async def list_vms(self) -> list[VmSpec]:
        """Every VM, sorted by id."""
        return sorted((loads(VmSpec, v) for v in await self._hvals(self._k("vms"))), key=lambda s: s.vm_id)

    # -- agent-local VMs: hash local_vms {vm: "node|ms"}, set local:<node> {vm} (for replacing a node's list)
    async def put_local_vms(self, node_id: str, vm_ids: Sequence[str], now_ms: int) -> None:
        """Replace the agent-local VM ids one node reported."""
        node_key = self._k("local", node_id)
        async with self._guard():
            old: Any = await self.r.smembers(node_key)
            gone = {v.decode() for v in old} - set(vm_ids)
            pipe = self.r.pipeline(transaction=True)
            if gone:
                pipe.hdel(self._k("local_vms"), *sorted(gone))
            pipe.delete(node_key)
            if vm_ids:
                pipe.hset(self._k("local_vms"), mapping={v: f"{node_id}|{now_ms}" for v in vm_ids})
                pipe.sadd(node_key, *vm_ids)
            await pipe.execute()

    async def local_vm_owner(self, vm_id: str) -> tuple[str, int] | None:
        """The node reporting ``vm_id`` as agent-local, and when."""
        v = await self._hget(self._k("local_vms"), vm_id)
        if not v:
            return None
        node, _, ms = v.decode().rpartition("|")
        return node, int(ms)

    # -- statuses
    async def put_statuses(self, statuses: Sequence[VmStatus]) -> None:
        """Replace the latest status of each VM."""
        if statuses:
            async with self._guard():
                await self.r.hset(
                    self._k("status"), mapping={s.vm_id: dumps(s, _NO_POLICY) for s in statuses}
                )

    async def get_status(self, vm_id: str) -> VmStatus | None:
        """The latest status of a VM."""
        v = await self._hget(self._k("status"), vm_id)
        return loads(VmStatus, v) if v else None

    async def list_statuses(self) -> dict[str, VmStatus]:
        """Every VM's latest status."""
        async with self._guard():
            raw: Any = await self.r.hgetall(self._k("status"))
        return {k.decode(): loads(VmStatus, v) for k, v in raw.items()}

    # -- policies
    async def next_version(self) -> int:
        """A new policy version (INCR)."""
        async with self._guard():
            return int(await self.r.incr(self._k("policy_version")))

    async def put_policy(self, entry: PolicyEntry) -> None:
        """Create or replace a policy entry."""
        await self._hset(self._k("policies"), entry.scope.key, dumps(entry))

    async def get_policy(self, scope_key: str) -> PolicyEntry | None:
        """A policy entry, or None."""
        v = await self._hget(self._k("policies"), scope_key)
        return loads(PolicyEntry, v) if v else None

    async def delete_policy(self, scope_key: str) -> bool:
        """Remove a policy entry."""
        return await self._hdel(self._k("policies"), scope_key)

    async def list_policies(self) -> list[PolicyEntry]:
        """Every policy entry."""
        return sorted(
            (loads(PolicyEntry, v) for v in await self._hvals(self._k("policies"))), key=lambda e: e.scope.key
        )

    async def get_mark(self, name: str) -> int:
        """A named integer."""
        v = await self._hget(self._k("marks"), name)
        return int(v) if v else 0

    async def set_mark(self, name: str, value: int) -> None:
        """Set a named integer."""
        await self._hset(self._k("marks"), name, str(int(value)))

    # -- adjustments
    async def put_adjustment(self, adj: Adjustment) -> None:
        """Create or replace an adjustment."""
        await self._hset(self._k("adjust"), adj.vm_id, dumps(adj))

    async def list_adjustments(self) -> dict[str, Adjustment]:
        """Every adjustment."""
        return {a.vm_id: a for a in (loads(Adjustment, v) for v in await self._hvals(self._k("adjust")))}

    async def get_adjustment(self, vm_id: str) -> Adjustment | None:
        """A VM's adjustment."""
        v = await self._hget(self._k("adjust"), vm_id)
        return loads(Adjustment, v) if v else None

    # -- reports
    async def add_reports(self, reports: Sequence[CycleReport]) -> None:
        """LPUSH + LTRIM per VM and on the all-VMs list, in one MULTI."""
        if not reports:
            return
        async with self._guard():
            pipe = self.r.pipeline(transaction=True)
            for rep in reports:
                doc = dumps(rep)
                pipe.lpush(self._k("reports", rep.vm_id), doc)
                pipe.lpush(self._k("reports_all"), doc)
            for vm_id in {r.vm_id for r in reports}:
                pipe.ltrim(self._k("reports", vm_id), 0, self.reports_keep - 1)
            pipe.ltrim(self._k("reports_all"), 0, self.all_reports_keep - 1)
            await pipe.execute()

    async def list_reports(self, vm_id: str = "", limit: int = 50) -> list[CycleReport]:
        """Newest reports first."""
        key = self._k("reports", vm_id) if vm_id else self._k("reports_all")
        async with self._guard():
            raw: Any = await self.r.lrange(key, 0, max(0, limit - 1))
        return [loads(CycleReport, v) for v in raw]

    # -- events
    async def append_event(self, event: Event) -> Event:
        """INCR the sequence and ZADD, atomically (Lua)."""
        async with self._guard():
            seq = await self.r.eval(
                _APPEND_EVENT, 2, self._k("event_seq"), self._k("events"), dumps(event), self.events_keep
            )
        event.seq = int(seq)
        return event

    async def append_events(self, events: Sequence[Event]) -> list[Event]:
        """Append events in one pipeline (each append is atomic; their order is kept)."""
        if not events:
            return []
        async with self._guard():
            pipe = self.r.pipeline(transaction=False)
            for ev in events:
                pipe.eval(
                    _APPEND_EVENT, 2, self._k("event_seq"), self._k("events"), dumps(ev), self.events_keep
                )
            seqs = await pipe.execute()
        for ev, seq in zip(events, seqs, strict=True):
            ev.seq = int(seq)
        return list(events)

    async def events_after(self, after_seq: int, vm_id: str = "", limit: int = 1000) -> list[Event]:
        """Events after ``after_seq``, oldest first (filtered by VM in batches)."""
        out: list[Event] = []
        cursor = after_seq
        batch = max(limit, 256)
        while len(out) < limit:
            async with self._guard():
                raw: Any = await self.r.zrangebyscore(
                    self._k("events"), f"({cursor}", "+inf", start=0, num=batch
                )
            if not raw:
                break
            for member in raw:
                seq_s, _, doc = member.decode().partition("|")
                cursor = int(seq_s)
                e = loads(Event, doc)
                e.seq = cursor
                if not vm_id or e.vm_id == vm_id:
                    out.append(e)
                    if len(out) >= limit:
                        break
            if len(raw) < batch:
                break
        return out

    async def last_event_seq(self) -> int:
        """The newest event's seq."""
        async with self._guard():
            v = await self.r.get(self._k("event_seq"))
        return int(v) if v else 0

    # -- coordination
    async def claim_order(self, order_id: str, owner: str, ttl_ms: int) -> bool:
        """SET NX PX: only the first claimant wins."""
        async with self._guard():
            ok = await self.r.set(self._k("order", order_id), owner, nx=True, px=max(1, ttl_ms))
        return bool(ok)

    async def acquire_leadership(self, replica_id: str, address: str, ttl_ms: int) -> bool:
        """Take the lease if free, renew it if ours (compare-and-set script)."""
        async with self._guard():
            ok = await self.r.eval(
                _ACQUIRE, 1, self._k("leader"), replica_id, f"{replica_id}|{address}", max(1, ttl_ms)
            )
        return bool(ok)

    async def release_leadership(self, replica_id: str) -> None:
        """Delete the lease if ours (compare-and-delete script)."""
        async with self._guard():
            await self.r.eval(_RELEASE, 1, self._k("leader"), replica_id)

    async def get_leader(self) -> LeaderInfo | None:
        """The current lease holder."""
        async with self._guard():
            pipe = self.r.pipeline(transaction=True)
            pipe.get(self._k("leader"))
            pipe.pttl(self._k("leader"))
            cur, ttl = await pipe.execute()
        if not cur:
            return None
        replica, _, address = cur.decode().partition("|")
        return LeaderInfo(replica, address, clock_ms(self.clock) + max(0, int(ttl)))
