"""SQLite state store: the embedded default (one file, WAL mode).

Why synchronous sqlite3 inside async methods: every statement here touches a
few rows of a local file and completes in microseconds (WAL with
``synchronous=NORMAL`` fsyncs only at checkpoints), far less than a thread
hand-off would cost. Running on the event loop also makes each method atomic
with respect to the other coroutines of this process; cross-process atomicity
(two replicas on one file) comes from ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tiermem.api import Adjustment, LeaderInfo, NodeInfo, PolicyEntry, VmSpec
from tiermem.control.clock import Clock, clock_ms
from tiermem.control.codec import dumps, loads
from tiermem.control.state import DEFAULT_EVENTS_KEEP, DEFAULT_REPORTS_KEEP, StateStore
from tiermem.errors import ConfigurationError, Unavailable
from tiermem.fsmodes import private_file
from tiermem.model import CycleReport, Event, VmStatus

__all__ = ["SqliteState"]

_NO_POLICY = frozenset({"policy"})
_MAX_SQL_INT = 2**63 - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (vm_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS statuses (vm_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS local_vms (vm_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, seen_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS policies (scope TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adjustments (vm_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reports (id INTEGER PRIMARY KEY AUTOINCREMENT, vm_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS reports_vm ON reports (vm_id, id);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, vm_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_vm ON events (vm_id, seq);
CREATE TABLE IF NOT EXISTS orders (order_id TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS orders_expiry ON orders (expires_ms);
CREATE TABLE IF NOT EXISTS leader (name TEXT PRIMARY KEY, replica_id TEXT NOT NULL, address TEXT NOT NULL,
                                   expires_ms INTEGER NOT NULL);
"""


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a sqlite URL: {url!r}")
    path = (parts.netloc + parts.path) if parts.netloc else parts.path
    if path in ("/:memory:", ":memory:"):
        return ":memory:"
    if not path:
        raise ConfigurationError(f"sqlite URL {url!r} names no file: use sqlite:///path/control.db")
    return path


class SqliteState(StateStore):
    """The embedded state store."""

    def __init__(
        self,
        url: str,
        clock: Clock | None = None,
        reports_keep: int = DEFAULT_REPORTS_KEEP,
        events_keep: int = DEFAULT_EVENTS_KEEP,
    ) -> None:
        super().__init__(clock, reports_keep, events_keep)
        self._url = url
        self._path = _path_of(url)
        self._db: sqlite3.Connection | None = None
        self._appends = 0

    @property
    def url(self) -> str:
        """The sqlite URL."""
        return self._url

    async def open(self) -> None:
        """Open the file (creating its directory) and the schema."""
        if self._path != ":memory:":
            try:
                Path(self._path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                private_file(self._path)
            except OSError as e:
                raise ConfigurationError(
                    f"cannot create the directory of {self._path}: {e.strerror}"
                ) from None
        try:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise ConfigurationError(f"cannot open state database {self._path}: {e}") from None
        self._db = db

    async def close(self) -> None:
        """Close the database."""
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise Unavailable("state store is not open")
        return self._db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE takes the write lock up front)."""
        db = self._conn
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as e:
            raise Unavailable(f"state store error: {e}") from None

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise Unavailable(f"state store error: {e}") from None

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    # -- nodes
    async def put_node(self, node: NodeInfo) -> None:
        """Create or replace a node."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?)", (node.node_id, dumps(node)))

    async def get_node(self, node_id: str) -> NodeInfo | None:
        """A node, or None."""
        row = self._one("SELECT doc FROM nodes WHERE node_id = ?", (node_id,))
        return loads(NodeInfo, row[0]) if row else None

    async def delete_node(self, node_id: str) -> bool:
        """Remove a node."""
        with self._tx() as db:
            return db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,)).rowcount > 0

    async def list_nodes(self) -> list[NodeInfo]:
        """Every node, sorted by id."""
        return [loads(NodeInfo, r[0]) for r in self._rows("SELECT doc FROM nodes ORDER BY node_id")]

    # -- VMs
    async def create_vm(self, spec: VmSpec) -> bool:
        """Register a VM unless the id is taken."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO vms VALUES (?, ?, ?)", (spec.vm_id, spec.node_id, dumps(spec))
            )
            return cur.rowcount > 0

    async def get_vm(self, vm_id: str) -> VmSpec | None:
        """A VM, or None."""
        row = self._one("SELECT doc FROM vms WHERE vm_id = ?", (vm_id,))
        return loads(VmSpec, row[0]) if row else None

    async def get_vms(self, vm_ids: Sequence[str]) -> dict[str, VmSpec]:
        """The known VMs among ``vm_ids``."""
        out: dict[str, VmSpec] = {}
        ids = list(dict.fromkeys(vm_ids))
        for i in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for vm_id, doc in self._rows(f"SELECT vm_id, doc FROM vms WHERE vm_id IN ({marks})", chunk):
                out[vm_id] = loads(VmSpec, doc)
        return out

    async def vm_nodes(self, vm_ids: Sequence[str]) -> dict[str, str]:
        """The node of each known VM among ``vm_ids``."""
        out: dict[str, str] = {}
        ids = list(dict.fromkeys(vm_ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for vm_id, node_id in self._rows(
                f"SELECT vm_id, node_id FROM vms WHERE vm_id IN ({marks})", chunk
            ):
                out[vm_id] = node_id
        return out

    async def delete_vm(self, vm_id: str) -> bool:
        """Remove a VM and everything kept for it."""
        with self._tx() as db:
            found = db.execute("DELETE FROM vms WHERE vm_id = ?", (vm_id,)).rowcount > 0
            for table in ("statuses", "adjustments", "reports"):
                db.execute(f"DELETE FROM {table} WHERE vm_id = ?", (vm_id,))
            db.execute("DELETE FROM policies WHERE scope = ?", (f"vm:{vm_id}",))
            return found

    async def list_vms(self) -> list[VmSpec]:
        """Every VM, sorted by id."""
        return [loads(VmSpec, r[0]) for r in self._rows("SELECT doc FROM vms ORDER BY vm_id")]

    # -- statuses
    async def put_statuses(self, statuses: Sequence[VmStatus]) -> None:
        """Replace the latest status of each VM."""
        if not statuses:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO statuses VALUES (?, ?)",
                [(s.vm_id, dumps(s, _NO_POLICY)) for s in statuses],
            )

    async def get_status(self, vm_id: str) -> VmStatus | None:
        """The latest status of a VM."""
        row = self._one("SELECT doc FROM statuses WHERE vm_id = ?", (vm_id,))
        return loads(VmStatus, row[0]) if row else None

    async def list_statuses(self) -> dict[str, VmStatus]:
        """Every VM's latest status."""
        return {r[0]: loads(VmStatus, r[1]) for r in self._rows("SELECT vm_id, doc FROM statuses")}

    # -- agent-local VMs
    async def put_local_vms(self, node_id: str, vm_ids: Sequence[str], now_ms: int) -> None:
        """Replace the agent-local VM ids one node reported."""
        with self._tx() as db:
            db.execute("DELETE FROM local_vms WHERE node_id = ?", (node_id,))
            db.executemany(
                "INSERT OR REPLACE INTO local_vms VALUES (?, ?, ?)", [(v, node_id, now_ms) for v in vm_ids]
            )

    async def local_vm_owner(self, vm_id: str) -> tuple[str, int] | None:
        """The node reporting ``vm_id`` as agent-local, and when."""
        row = self._one("SELECT node_id, seen_ms FROM local_vms WHERE vm_id = ?", (vm_id,))
        return (str(row[0]), int(row[1])) if row else None

    # -- policies
    async def next_version(self) -> int:
        """A new policy version."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO marks VALUES ('policy_version', 1) "
                "ON CONFLICT(name) DO UPDATE SET value = value + 1"
            )
            return int(db.execute("SELECT value FROM marks WHERE name = 'policy_version'").fetchone()[0])

    async def put_policy(self, entry: PolicyEntry) -> None:
        """Create or replace a policy entry."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO policies VALUES (?, ?)", (entry.scope.key, dumps(entry)))

    async def get_policy(self, scope_key: str) -> PolicyEntry | None:
        """A policy entry, or None."""
        row = self._one("SELECT doc FROM policies WHERE scope = ?", (scope_key,))
        return loads(PolicyEntry, row[0]) if row else None

    async def delete_policy(self, scope_key: str) -> bool:
        """Remove a policy entry."""
        with self._tx() as db:
            return db.execute("DELETE FROM policies WHERE scope = ?", (scope_key,)).rowcount > 0

    async def list_policies(self) -> list[PolicyEntry]:
        """Every policy entry."""
        return [loads(PolicyEntry, r[0]) for r in self._rows("SELECT doc FROM policies ORDER BY scope")]

    async def get_mark(self, name: str) -> int:
        """A named integer."""
        row = self._one("SELECT value FROM marks WHERE name = ?", (name,))
        return int(row[0]) if row else 0

    async def set_mark(self, name: str, value: int) -> None:
        """Set a named integer."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO marks VALUES (?, ?)", (name, int(value)))

    # -- adjustments
    async def put_adjustment(self, adj: Adjustment) -> None:
        """Create or replace an adjustment."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO adjustments VALUES (?, ?)", (adj.vm_id, dumps(adj)))

    async def list_adjustments(self) -> dict[str, Adjustment]:
        """Every adjustment."""
        return {r[0]: loads(Adjustment, r[1]) for r in self._rows("SELECT vm_id, doc FROM adjustments")}

    async def get_adjustment(self, vm_id: str) -> Adjustment | None:
        """A VM's adjustment."""
        row = self._one("SELECT doc FROM adjustments WHERE vm_id = ?", (vm_id,))
        return loads(Adjustment, row[0]) if row else None

    # -- reports
    async def add_reports(self, reports: Sequence[CycleReport]) -> None:
        """Append reports and trim each VM's history."""
        if not reports:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT INTO reports (vm_id, doc) VALUES (?, ?)", [(r.vm_id, dumps(r)) for r in reports]
            )
            for vm_id in {r.vm_id for r in reports}:
                db.execute(
                    "DELETE FROM reports WHERE vm_id = ? AND id <= "
                    "(SELECT id FROM reports WHERE vm_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (vm_id, vm_id, self.reports_keep),
                )

    async def list_reports(self, vm_id: str = "", limit: int = 50) -> list[CycleReport]:
        """Newest reports first."""
        if vm_id:
            rows = self._rows(
                "SELECT doc FROM reports WHERE vm_id = ? ORDER BY id DESC LIMIT ?", (vm_id, limit)
            )
        else:
            rows = self._rows("SELECT doc FROM reports ORDER BY id DESC LIMIT ?", (limit,))
        return [loads(CycleReport, r[0]) for r in rows]

    # -- events
    async def append_event(self, event: Event) -> Event:
        """Append an event and trim the log now and then."""
        with self._tx() as db:
            cur = db.execute("INSERT INTO events (vm_id, doc) VALUES (?, ?)", (event.vm_id, dumps(event)))
            seq = int(cur.lastrowid or 0)
            self._appends += 1
            if self._appends % 1000 == 0:  # trimming on every append would double the write cost
                db.execute("DELETE FROM events WHERE seq <= ?", (seq - self.events_keep,))
        event.seq = seq
        return event

    async def append_events(self, events: Sequence[Event]) -> list[Event]:
        """Append events in one transaction."""
        if not events:
            return []
        with self._tx() as db:
            for ev in events:
                cur = db.execute("INSERT INTO events (vm_id, doc) VALUES (?, ?)", (ev.vm_id, dumps(ev)))
                ev.seq = int(cur.lastrowid or 0)
                self._appends += 1
                if self._appends % 1000 == 0:
                    db.execute("DELETE FROM events WHERE seq <= ?", (ev.seq - self.events_keep,))
        return list(events)

    async def events_after(self, after_seq: int, vm_id: str = "", limit: int = 1000) -> list[Event]:
        """Events after ``after_seq``, oldest first."""
        after_seq = min(max(after_seq, 0), _MAX_SQL_INT)  # a uint64 from the wire may not fit SQLite's int64
        if vm_id:
            rows = self._rows(
                "SELECT seq, doc FROM events WHERE vm_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (vm_id, after_seq, limit),
            )
        else:
            rows = self._rows(
                "SELECT seq, doc FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            )
        out = []
        for seq, doc in rows:
            e = loads(Event, doc)
            e.seq = int(seq)
            out.append(e)
        return out

    async def last_event_seq(self) -> int:
        """The newest event's seq."""
        row = self._one("SELECT MAX(seq) FROM events")
        return int(row[0] or 0) if row else 0

    # -- coordination
    async def claim_order(self, order_id: str, owner: str, ttl_ms: int) -> bool:
        """Claim an order unless someone holds an unexpired claim."""
        now = clock_ms(self.clock)
        with self._tx() as db:
            db.execute("DELETE FROM orders WHERE order_id = ? AND expires_ms <= ?", (order_id, now))
            cur = db.execute("INSERT OR IGNORE INTO orders VALUES (?, ?, ?)", (order_id, owner, now + ttl_ms))
            claimed = cur.rowcount > 0
            if claimed and hash(order_id) % 256 == 0:  # sweep expired claims now and then
                db.execute("DELETE FROM orders WHERE expires_ms <= ?", (now,))
            return claimed

    async def acquire_leadership(self, replica_id: str, address: str, ttl_ms: int) -> bool:
        """Take or renew the lease."""
        now = clock_ms(self.clock)
        with self._tx() as db:
            row = db.execute("SELECT replica_id, expires_ms FROM leader WHERE name = 'scheduler'").fetchone()
            if row is not None and row[0] != replica_id and row[1] > now:
                return False
            db.execute(
                "INSERT OR REPLACE INTO leader VALUES ('scheduler', ?, ?, ?)",
                (replica_id, address, now + ttl_ms),
            )
            return True

    async def release_leadership(self, replica_id: str) -> None:
        """Drop the lease if held."""
        with self._tx() as db:
            db.execute("DELETE FROM leader WHERE name = 'scheduler' AND replica_id = ?", (replica_id,))

    async def get_leader(self) -> LeaderInfo | None:
        """The current lease holder."""
        row = self._one("SELECT replica_id, address, expires_ms FROM leader WHERE name = 'scheduler'")
        if row is None or row[2] <= clock_ms(self.clock):
            return None
        return LeaderInfo(row[0], row[1], int(row[2]))
