"""Firecracker snapshot restore through the node agent, on the real kernel, from every store.

The client (``tiermem.guests.firecracker``) restores exactly like Firecracker:
private anonymous memory, UFFDIO_API with EVENT_REMOVE only, REGISTER MISSING, one
sendmsg with the compact JSON array of GuestRegionUffdMapping and one fd, the socket
left open, vCPU threads touching pages. Stores are real servers (redis-server,
SeaweedFS over HTTP).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.servers import RedisServer, S3Server
from tiermem.agent.attach import start_handoff
from tiermem.agent.node import Agent
from tiermem.agent.restore import RestoreService
from tiermem.agent.snapshot import snapshot_space
from tiermem.config import AgentSettings
from tiermem.errors import AlreadyExists, FailedPrecondition
from tiermem.guests.firecracker import FirecrackerProcess
from tiermem.model import CycleMode, EventKind

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(300)]

PS = 4096
MiB = 1 << 20


class Node:
    """An agent with its shared handoff socket and its restore service."""

    def __init__(self, tmp: Path, stores: dict[str, str] | None = None) -> None:
        s = AgentSettings(
            node_id="n1",
            data_dir=str(tmp / "agent"),
            autonomous=False,
            stores=stores or {},
            handoff_socket=str(tmp / "h" / "handoff.sock"),
            restore_socket_dir=str(tmp / "r"),
        )
        self.agent = Agent(s)
        self.stop_handoff = start_handoff(self.agent)
        self.restores = RestoreService(self.agent).start()

    def close(self) -> None:
        self.restores.close()
        if self.stop_handoff:
            self.stop_handoff()
        self.agent.close()

    def events(self, kind: EventKind) -> list[dict[str, str]]:
        return [
            dict(e.attributes) | {"message": e.message} for e in self.agent.events.history() if e.kind is kind
        ]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


def memory_file(path: Path, size: int, seed: int = 1) -> bytes:
    """Random bytes with runs of zero pages (so ZEROPAGE is exercised too)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    pages = data.reshape(-1, PS)
    zero = rng.random(pages.shape[0]) < 0.1
    zero[100:164] = True  # a run of zero pages
    pages[zero] = 0
    raw = data.tobytes()
    path.write_bytes(raw)
    return raw


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def restore_and_compare(
    node: Node, vm: str, raw: bytes, regions: str, tmp: Path, hole: str = "0", variant: str = "current"
) -> dict[str, object]:
    fc = FirecrackerProcess(node.restores.socket_path(vm), regions, hole=hole, vcpus=2, variant=variant)
    try:
        out = tmp / f"{vm}.dump"
        ans = fc.cmd(f"dump {out}", timeout=240)
        assert ans["bytes"] == len(raw)
        got = out.read_bytes()
        if got != raw:
            bad = [
                p for p in range(len(raw) // PS) if got[p * PS : (p + 1) * PS] != raw[p * PS : (p + 1) * PS]
            ]
            pytest.fail(f"{len(bad)} pages differ from the memory file, first {bad[:5]}")
        s = node.agent.sessions[vm]
        assert s.restore is not None
        summary = s.restore.summary() | {
            "faults_served": s.counters.faults_served,
            "prefetch": s.policy.prefetch_pages,
        }
        st = s.status()  # every page is in memory now; the snapshot stays in the store
        assert (st.evicted_pages, st.resident_pages) == (0, len(raw) // PS)
        assert node.agent.index.count(vm) == sum(
            1 for p in range(len(raw) // PS) if any(raw[p * PS : (p + 1) * PS])
        )
        reg = node.agent.metrics.registry

        def metric(how: str) -> float:
            return reg.get_sample_value("tiermem_agent_restore_pages_total", {"vm": vm, "how": how}) or 0.0

        for how, key in (
            ("on_demand", "pages_on_demand"),
            ("zero", "zero_pages"),
            ("prefaulted", "pages_prefaulted"),
        ):
            want = summary[key]
            wait_until(lambda h=how, w=want: metric(h) == w, 5, f"the {how} pages metric")  # type: ignore[misc]
        read = reg.get_sample_value("tiermem_agent_restore_store_bytes_read_total", {"vm": vm})
        assert read == summary["store_bytes_read"]
        assert (reg.get_sample_value("tiermem_agent_restore_first_fault_seconds_count") or 0) >= 1
        with pytest.raises(FailedPrecondition):  # no tracking of private anonymous memory: no cycles
            node.agent.run_cycle(vm, CycleMode.EVICT, 10)
        return summary
    finally:
        fc.close()
        wait_until(lambda: vm not in node.agent.sessions, 10, "the restore session to end")


def test_import_then_restore_from_the_local_store_is_byte_identical(node: Node, tmp_path: Path) -> None:
    raw = memory_file(tmp_path / "mem", 16 * MiB)  # 64 MiB per store: test_firecracker_agent_cli.py
    info = node.restores.import_snapshot("snap-local", mem_file=str(tmp_path / "mem"))
    zero_pages = sum(1 for p in range(len(raw) // PS) if not any(raw[p * PS : (p + 1) * PS]))
    assert (info.pages, info.zero_pages) == (len(raw) // PS, zero_pages)
    assert info.stored_bytes >= (info.pages - zero_pages) * PS  # random pages do not compress
    assert info.socket == node.restores.socket_path("snap-local") and os.path.exists(info.socket)
    assert node.agent.index.count("snap-local") == info.pages - zero_pages
    summary = restore_and_compare(node, "snap-local", raw, "10M,6M", tmp_path, hole="4M")
    assert summary["zero_pages"] == zero_pages and summary["pages_prefaulted"] == 0
    assert summary["pages_on_demand"] == info.pages - zero_pages
    assert summary["store_bytes_read"] == info.stored_bytes
    assert summary["first_fault_ms"] is not None
    wait_until(lambda: bool(node.events(EventKind.RESTORE_FINISHED)), 10, "the RESTORE_FINISHED event")
    assert node.events(EventKind.RESTORE_FINISHED)[-1]["pages_on_demand"] == str(info.pages - zero_pages)
    # the snapshot is intact: a second Firecracker restores it again, byte for byte
    assert node.agent.index.count("snap-local") == info.pages - zero_pages
    restore_and_compare(node, "snap-local", raw, "16M", tmp_path, variant="page_size_kib_kib")


@pytest.mark.redis
def test_restore_from_redis_is_byte_identical(tmp_path: Path, redis_srv: RedisServer) -> None:
    node = Node(tmp_path, {"redis": redis_srv.url})
    try:
        raw = memory_file(tmp_path / "mem", 16 * MiB, seed=2)
        info = node.restores.import_snapshot(
            "snap-redis", mem_file=str(tmp_path / "mem"), store="redis", prefetch_pages=32
        )
        rec = node.agent.index.record("snap-redis")
        assert rec is not None
        space = snapshot_space("n1", rec)
        assert node.agent.store("redis").usage(space).pages == info.pages - info.zero_pages
        got = restore_and_compare(node, "snap-redis", raw, "12M,4M", tmp_path, hole="2M", variant="bare")
        assert got["prefetch"] == 32
        # each fault brought up to 32 following pages: far fewer faults than pages
        assert int(got["faults_served"]) < (info.pages - info.zero_pages) // 8  # type: ignore[call-overload]
    finally:
        node.close()


@pytest.mark.s3
def test_restore_from_s3_is_byte_identical_and_imports_from_an_s3_object(
    tmp_path: Path, s3_srv: S3Server
) -> None:
    node = Node(tmp_path, {"s3": s3_srv.url("restore")})
    try:
        raw = memory_file(tmp_path / "mem", 16 * MiB, seed=3)
        s3_srv.client().put_object(Bucket=s3_srv.bucket, Key="snapshots/mem.bin", Body=raw)
        obj = f"s3://{s3_srv.bucket}/snapshots/mem.bin?endpoint={s3_srv.endpoint}&region={s3_srv.region}"
        seen: list[tuple[int, int]] = []
        info = node.restores.import_snapshot(
            "snap-s3",
            mem_object=obj,
            store="s3",
            prefetch_pages=64,
            progress=lambda d, t: seen.append((d, t)),
        )
        assert len(seen) == 4 and seen[-1] == (info.pages, info.pages)  # streamed: one ranged GET per 4 MiB
        restore_and_compare(node, "snap-s3", raw, "16M", tmp_path, variant="page_size_kib")
    finally:
        node.close()


def test_prefault_brings_every_page_in_at_a_bounded_rate(tmp_path: Path) -> None:
    node = Node(tmp_path)
    try:
        raw = memory_file(tmp_path / "mem", 8 * MiB, seed=4)
        node.restores.import_snapshot("snap-pf", mem_file=str(tmp_path / "mem"), prefault_pages_per_s=4000)
        fc = FirecrackerProcess(node.restores.socket_path("snap-pf"), "8M")
        try:
            fc.cmd("touch 0")  # the guest resumes: its first fault starts the prefault
            s = node.agent.sessions["snap-pf"]
            assert s.restore is not None
            r = s.restore
            wait_until(lambda: r.remaining() == 0, 30, "the prefault to finish")
            summary = r.summary()
            assert summary["pages_prefaulted"] > 0
            assert summary["pages_on_demand"] + summary["pages_prefaulted"] + summary["zero_pages"] == 2048
            served = s.counters.faults_served
            out = tmp_path / "pf.dump"
            fc.cmd(f"dump {out}")
            assert out.read_bytes() == raw
            assert s.counters.faults_served == served  # everything was resident: no fault on the dump
        finally:
            fc.close()
    finally:
        node.close()


def test_balloon_remove_then_the_pages_read_zero_and_the_snapshot_is_kept(node: Node, tmp_path: Path) -> None:
    raw = memory_file(tmp_path / "mem", 4 * MiB, seed=5)
    node.restores.import_snapshot("snap-bal", mem_file=str(tmp_path / "mem"))
    stored = node.agent.index.count("snap-bal")
    fc = FirecrackerProcess(node.restores.socket_path("snap-bal"), "2M,2M", hole="64K")
    try:
        fc.cmd("touch 0-1023")
        nonzero = [p for p in range(1024) if any(raw[p * PS : (p + 1) * PS])]
        pages = nonzero[10:20] + nonzero[-5:]  # some in each region
        assert fc.cmd("zero " + ",".join(map(str, pages)))["zero"] == []
        fc.cmd("balloon " + ",".join(map(str, pages)))
        assert (
            fc.cmd("zero " + ",".join(map(str, pages)))["zero"] == pages
        )  # zeroes, never the snapshot's bytes
        untouched = [p for p in nonzero if p not in pages][:5]
        assert fc.cmd("zero " + ",".join(map(str, untouched)))["zero"] == []
        r = node.agent.sessions["snap-bal"].restore
        assert r is not None and r.summary()["removed_pages"] == len(pages)
    finally:
        fc.close()
    wait_until(lambda: "snap-bal" not in node.agent.sessions, 10, "the session to end")
    assert node.agent.index.count("snap-bal") == stored  # a balloon never deletes snapshot pages


def test_killing_the_client_mid_restore_leaves_the_agent_healthy(node: Node, tmp_path: Path) -> None:
    raw = memory_file(tmp_path / "mem", 16 * MiB, seed=6)
    node.restores.import_snapshot("snap-kill", mem_file=str(tmp_path / "mem"))
    fc = FirecrackerProcess(node.restores.socket_path("snap-kill"), "16M", vcpus=4)
    fc.cmd("start 0-4095")
    wait_until(
        lambda: (
            "snap-kill" in node.agent.sessions
            and (node.agent.sessions["snap-kill"].restore is not None)
            and node.agent.sessions["snap-kill"].counters.faults_served > 20
        ),
        30,
        "faults to be served",
    )
    fc.kill()
    fc.close()
    wait_until(lambda: bool(node.events(EventKind.RESTORE_FINISHED)), 10, "the RESTORE_FINISHED event")
    # healthy: the same snapshot restores again, fully, and other VMs are unaffected
    restore_and_compare(node, "snap-kill", raw, "16M", tmp_path)


def test_a_restore_socket_refuses_what_does_not_match_its_snapshot(node: Node, tmp_path: Path) -> None:
    memory_file(tmp_path / "mem", 4 * MiB, seed=7)
    node.restores.import_snapshot("snap-size", mem_file=str(tmp_path / "mem"))
    fc = FirecrackerProcess(node.restores.socket_path("snap-size"), "2M")  # half the snapshot's size
    try:
        wait_until(lambda: bool(node.events(EventKind.HANDOFF_REFUSED)), 10, "the refusal")
        assert "1024" in node.events(EventKind.HANDOFF_REFUSED)[-1]["message"]
        fc.cmd("start 0-3")
        time.sleep(0.5)
        assert fc.cmd("progress")["done"] == 0  # refused: nothing served, no zeros
    finally:
        fc.kill()
        fc.close()
    with pytest.raises(AlreadyExists):
        node.restores.import_snapshot("snap-size", mem_file=str(tmp_path / "mem"))
    with pytest.raises(FailedPrecondition):
        node.restores.detach("snap-size", purge=False)  # keeps the snapshot
    n = node.restores.detach("snap-size", purge=True)
    assert n > 0 and node.agent.index.record("snap-size") is None
    assert node.agent.store("default").usage().pages == 0
    assert not os.path.exists(node.restores.socket_path("snap-size"))


def test_after_an_agent_restart_the_snapshot_restores_and_unfinished_imports_are_dropped(
    tmp_path: Path,
) -> None:
    raw = memory_file(tmp_path / "mem", 4 * MiB, seed=8)
    node = Node(tmp_path)
    try:
        node.restores.import_snapshot("snap-rs", mem_file=str(tmp_path / "mem"))
        # an import the agent never finished (as if it crashed mid-way): some pages, state "importing"
        from tiermem.agent.index import VmRecord
        from tiermem.store.base import PageBlob

        node.agent.index.add_vm(
            VmRecord("snap-half", "uffd", 1024, PS, {"snapshot": {"state": "importing", "store": "default"}})
        )
        st = node.agent.store("default")
        node.agent.index.put_many(
            "snap-half", "default", st.put_pages("snap-half", [PageBlob(0, 1, b"x" * PS)])
        )
    finally:
        node.close()
    node = Node(tmp_path)
    try:
        assert node.agent.index.record("snap-half") is None
        assert node.agent.store("default").usage("snap-half").pages == 0
        assert not os.path.exists(node.restores.socket_path("snap-half"))
        restore_and_compare(node, "snap-rs", raw, "4M", tmp_path)
    finally:
        node.close()


def test_a_second_process_on_the_same_restore_socket_is_refused(node: Node, tmp_path: Path) -> None:
    raw = memory_file(tmp_path / "mem", 4 * MiB, seed=9)
    node.restores.import_snapshot("snap-two", mem_file=str(tmp_path / "mem"))
    first = FirecrackerProcess(node.restores.socket_path("snap-two"), "4M")
    try:
        first.cmd("touch 0")
        second = FirecrackerProcess(node.restores.socket_path("snap-two"), "4M")
        try:
            wait_until(lambda: bool(node.events(EventKind.HANDOFF_REFUSED)), 10, "the refusal")
            assert "another process" in node.events(EventKind.HANDOFF_REFUSED)[-1]["message"]
            second.cmd("start 1")
            time.sleep(0.5)
            assert second.cmd("progress")["done"] == 0
        finally:
            second.kill()
            second.close()
        out = tmp_path / "first.dump"
        first.cmd(f"dump {out}")
        assert out.read_bytes() == raw  # the first restore never noticed
    finally:
        first.close()
