"""Issue 17, tenant part: the attacks of the adversarial review, replayed through the public surfaces.

A real control plane and a real node agent serve on loopback with bearer tokens
for an admin, two tenants and one node; the attacks use gRPC with those tokens,
the agent's handoff socket, and the ``tiermem`` CLI. Every test here failed on
the code before the fix (the review's findings 4, 5, 6, 9, 10, 11, 13).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from tests.helpers.certs import issue_cert
from tiermem.cli.main import cli
from tiermem.config import AgentSettings, ControlPlaneSettings, TlsSettings
from tiermem.handoff.wire import decode_body, decode_frame_length
from tiermem.rpc.channel import aio_channel, auth_metadata
from tiermem.v1 import agent_pb2 as apb
from tiermem.v1 import agent_pb2_grpc as agrpc
from tiermem.v1 import control_pb2 as cp
from tiermem.v1 import control_pb2_grpc as cpg
from tiermem.v1 import types_pb2 as t

ADMIN, ACME, GLOBEX = "admin-tok-5f0c9a1e", "acme-tok-7b2d4e6f", "globex-tok-9a8b7c6d"
NODE, AGENT = "node-n1-tok-3c4d5e6f", "agent-tok-1a2b3c4d"
NODE_ID = "n1"
MiB = 1 << 20
CAPACITY = 64 * MiB
TRACE_CAP = 1 * MiB
SECRET = "root:$6$S3CRET-HASH-DO-NOT-ECHO$:19000:0:99999:7:::"


@dataclass
class Stack:
    """A control plane and one agent on loopback, and a stub per service."""

    tmp: Path
    cp: Any
    agent: Any
    ch: grpc.aio.Channel
    ach: grpc.aio.Channel

    @property
    def stub(self) -> cpg.ControlPlaneAsyncStub:
        return cpg.ControlPlaneStub(self.ch)

    @property
    def agent_stub(self) -> agrpc.NodeAgentAsyncStub:
        return agrpc.NodeAgentStub(self.ach)

    @property
    def traces(self) -> Path:
        return self.tmp / "traces"


@contextlib.asynccontextmanager
async def stack(tmp: Path, mtls: bool = False, **cp_settings: Any) -> AsyncIterator[Stack]:
    """The stack; with ``mtls`` the control plane requires client certificates (the agent and the
    test present one signed by the same CA), so tokens are checked on top of mTLS."""
    from tiermem.agent.server import serve_agent
    from tiermem.control.server import serve_control_plane

    (tmp / "traces").mkdir()
    server_tls = client_tls = TlsSettings()
    if mtls:
        ca_pem, _, ca = issue_cert(tmp, "ca", None)
        srv_pem, srv_key, _ = issue_cert(tmp, "server", ca, san_ip="127.0.0.1")
        cli_pem, cli_key, _ = issue_cert(tmp, "client", ca)
        server_tls = TlsSettings(
            cert_file=str(srv_pem), key_file=str(srv_key), ca_file=str(ca_pem), require_client_cert=True
        )
        client_tls = TlsSettings(cert_file=str(cli_pem), key_file=str(cli_key), ca_file=str(ca_pem))
    cps = ControlPlaneSettings(
        listen="127.0.0.1:0",
        state=f"sqlite:///{tmp}/cp.db",
        lease_ttl_ms=5000,
        agent_token=AGENT,
        token=f"{ADMIN},acme:{ACME},globex:{GLOBEX},node:{NODE_ID}:{NODE}",
        tls=server_tls,
        **{"scheduler": False, **cp_settings},
    )
    cpl = await serve_control_plane(cps)
    ags = AgentSettings(
        node_id=NODE_ID,
        listen="127.0.0.1:0",
        data_dir=str(tmp / "agent"),
        control_plane=cpl.address,
        control_plane_token=NODE,
        token=f"{AGENT},acme:{ACME}",
        heartbeat_ms=200,
        capacity_bytes=CAPACITY,
        trace_dir=str(tmp / "traces"),
        trace_max_bytes=TRACE_CAP,
        handshake_timeout_s=1.0,
        fsync=False,
        client_tls=client_tls,
    )
    agent = await serve_agent(ags)
    ch = aio_channel(cpl.address, client_tls)
    ach = aio_channel(agent.address)
    s = Stack(tmp, cpl, agent, ch, ach)
    try:
        # the agent registers with its node-role token: the node role is enough for an agent
        deadline = time.monotonic() + 20
        while not any(
            n.node_id == NODE_ID and n.up
            for n in (await s.stub.ListNodes(cp.ListNodesRequest(), metadata=md(ADMIN), timeout=5)).nodes
        ):
            assert time.monotonic() < deadline, "the agent never registered with its node token"
            await asyncio.sleep(0.1)
        yield s
    finally:
        await ch.close()
        await ach.close()
        await agent.stop()
        await cpl.stop()


def md(token: str) -> tuple[tuple[str, str], ...]:
    return auth_metadata(token)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call
    return ei.value


def sim_vm(vm_id: str, memory: int = MiB, workload: str = "", node: str = NODE_ID) -> cp.VmSpec:
    return cp.VmSpec(
        vm_id=vm_id,
        node_id=node,
        memory_bytes=memory,
        backend=t.KERNEL_BACKEND_SIM,
        workload=workload,
        synthetic=not workload,
    )


def uffd_vm(vm_id: str, memory: int, node: str) -> cp.VmSpec:
    return cp.VmSpec(vm_id=vm_id, node_id=node, memory_bytes=memory, backend=t.KERNEL_BACKEND_UFFD)


# --- 6. node role -------------------------------------------------------------------------------------------
async def test_node_token_cannot_purge_another_tenants_vm_or_act_as_another_node(tmp_path: Path) -> None:
    async with stack(tmp_path, mtls=True) as s:  # a valid client certificate does not widen the node role
        await s.stub.RegisterVm(
            cp.RegisterVmRequest(vm=sim_vm("globex.db"), attach=True), metadata=md(ADMIN), timeout=10
        )
        # the review's attack: with the node token, purge another tenant's VM
        e = await refused(
            s.stub.DeregisterVm(
                cp.DeregisterVmRequest(vm_id="globex.db", purge=True), metadata=md(NODE), timeout=5
            )
        )
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "node token" in (e.details() or "")
        # nor any other method than its own node's registration, heartbeat and reports
        for call in [
            s.stub.ListVmStatus(cp.ListVmStatusRequest(), metadata=md(NODE), timeout=5),
            s.stub.SetPolicy(
                cp.SetPolicyRequest(
                    scope=cp.PolicyScope(fleet=True), policy=t.EvictionPolicy(paused=True), fields=["paused"]
                ),
                metadata=md(NODE),
                timeout=5,
            ),
            s.stub.DeregisterNode(cp.DeregisterNodeRequest(node_id=NODE_ID), metadata=md(NODE), timeout=5),
            s.stub.RegisterNode(
                cp.RegisterNodeRequest(node=cp.NodeInfo(node_id="n2", address="127.0.0.1:9")),
                metadata=md(NODE),
                timeout=5,
            ),
            s.stub.Heartbeat(cp.HeartbeatRequest(node_id="n2"), metadata=md(NODE), timeout=5),
            s.stub.ReportCycles(cp.ReportCyclesRequest(node_id="n2"), metadata=md(NODE), timeout=5),
        ]:
            assert (await refused(call)).code() == grpc.StatusCode.PERMISSION_DENIED
        # a node cannot borrow a tenant's identity either
        e = await refused(
            s.stub.Heartbeat(
                cp.HeartbeatRequest(node_id=NODE_ID),
                metadata=(*md(NODE), ("x-tiermem-tenant", "globex")),
                timeout=5,
            )
        )
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        # as itself it works, and the VM is untouched
        hb = await s.stub.Heartbeat(cp.HeartbeatRequest(node_id=NODE_ID), metadata=md(NODE), timeout=5)
        assert hb.lease_ttl_ms > 0
        st = await s.stub.GetVmStatus(cp.GetVmStatusRequest(vm_id="globex.db"), metadata=md(ADMIN), timeout=5)
        assert st.vm_id == "globex.db" and st.state == t.VM_STATE_ARMED
        nodes = (await s.stub.ListNodes(cp.ListNodesRequest(), metadata=md(ADMIN), timeout=5)).nodes
        assert [n.node_id for n in nodes] == [NODE_ID]


# --- 13. tenant read filters -------------------------------------------------------------------------------
async def test_tenant_reads_hide_nodes_foreign_policies_and_node_events(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        for vm in ("acme.web", "globex.db"):
            await s.stub.RegisterVm(
                cp.RegisterVmRequest(vm=sim_vm(vm), attach=True), metadata=md(ADMIN), timeout=10
            )
        pol = t.EvictionPolicy(interval_ms=45_000)
        for scope in (
            cp.PolicyScope(selector="team=globex-secret-project"),
            cp.PolicyScope(fleet=True),
            cp.PolicyScope(vm_id="acme.web"),
            cp.PolicyScope(vm_id="globex.db"),
        ):
            await s.stub.SetPolicy(
                cp.SetPolicyRequest(scope=scope, policy=pol, fields=["interval_ms"]),
                metadata=md(ADMIN),
                timeout=5,
            )

        nodes = await s.stub.ListNodes(cp.ListNodesRequest(), metadata=md(ACME), timeout=5)
        assert list(nodes.nodes) == []
        entries = (await s.stub.ListPolicies(cp.ListPoliciesRequest(), metadata=md(ACME), timeout=5)).entries
        assert [e.scope.vm_id for e in entries] == ["acme.web"]
        events = [e async for e in s.stub.StreamEvents(t.StreamEventsRequest(), metadata=md(ACME), timeout=5)]
        assert events and all(e.vm_id.startswith("acme.") for e in events)
        reports = await s.stub.ListCycleReports(cp.ListCycleReportsRequest(), metadata=md(ACME), timeout=5)
        assert all(r.vm_id.startswith("acme.") for r in reports.reports)
        # the agent's own reads: node-wide statistics are cleared, other tenants' VMs dropped
        stats = await s.agent_stub.GetStats(apb.GetStatsRequest(), metadata=md(ACME), timeout=5)
        assert not stats.HasField("node") and [v.vm_id for v in stats.vms] == ["acme.web"]
        listed = await s.agent_stub.ListVms(apb.ListVmsRequest(), metadata=md(ACME), timeout=5)
        assert [v.vm_id for v in listed.vms] == ["acme.web"]

        # the admin still sees everything (the filters are not a blanket)
        nodes = await s.stub.ListNodes(cp.ListNodesRequest(), metadata=md(ADMIN), timeout=5)
        assert [n.node_id for n in nodes.nodes] == [NODE_ID]
        entries = (await s.stub.ListPolicies(cp.ListPoliciesRequest(), metadata=md(ADMIN), timeout=5)).entries
        assert len(entries) == 4
        events = [
            e async for e in s.stub.StreamEvents(t.StreamEventsRequest(), metadata=md(ADMIN), timeout=5)
        ]
        assert any(not e.vm_id for e in events)  # node events exist, and were hidden from the tenant above
        stats = await s.agent_stub.GetStats(apb.GetStatsRequest(), metadata=md(AGENT), timeout=5)
        assert stats.node.node_id == NODE_ID


# --- 9. ids ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        "acme.vm1\n",
        "acme.vm1\r",
        "acme.vm\x00",
        "acme.vm1\t",
        "acme.v" + "m" * 60,
        "acme.vm\u0661",
        "acme.vm1 ",
    ],
)
async def test_ids_with_control_characters_or_too_long_are_refused(tmp_path: Path, bad: str) -> None:
    async with stack(tmp_path) as s:
        await s.stub.RegisterVm(
            cp.RegisterVmRequest(vm=uffd_vm("acme.vm1", MiB, NODE_ID)), metadata=md(ACME), timeout=5
        )
        for token in (ACME, ADMIN):
            e = await refused(
                s.stub.RegisterVm(
                    cp.RegisterVmRequest(vm=uffd_vm(bad, MiB, NODE_ID)), metadata=md(token), timeout=5
                )
            )
            # a tenant sees PERMISSION_DENIED (the id is not one of its VMs' ids), the admin INVALID_ARGUMENT
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
        listed = await s.stub.ListVmStatus(cp.ListVmStatusRequest(), metadata=md(ADMIN), timeout=5)
        assert [v.vm_id for v in listed.vms] == ["acme.vm1"]  # never a second, look-alike VM


def test_cli_refuses_a_newline_id_before_sending(tmp_path: Path) -> None:
    async def go() -> None:
        async with stack(tmp_path) as s:
            env = {"TIERMEM_SERVER": s.cp.address, "TIERMEM_TOKEN": ACME, "TIERMEM_CONFIG": None}
            r = await asyncio.to_thread(
                CliRunner().invoke,
                cli,
                ["vm", "register", "acme.vm1\n", "--node", NODE_ID, "--memory", "1MiB", "--backend", "uffd"],
                env=env,
            )
            assert r.exit_code == 1, r.output
            assert "invalid VM id" in r.output and len(r.output.strip().splitlines()) == 1
            listed = await s.stub.ListVmStatus(cp.ListVmStatusRequest(), metadata=md(ADMIN), timeout=5)
            assert list(listed.vms) == []

    asyncio.run(go())


def _handoff_exchange(
    path: str, chunks: list[bytes], pause_s: float, give_up_s: float
) -> tuple[bytes, float]:
    """Send ``chunks`` with ``pause_s`` between them; returns (what the agent answered, seconds until it closed)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(give_up_s)
    start = time.monotonic()
    data = b""
    try:
        s.connect(path)
        for c in chunks:
            try:
                s.sendall(c)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(pause_s)
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
    finally:
        s.close()
    return data, time.monotonic() - start


def _frame(desc: dict[str, Any]) -> bytes:
    body = json.dumps(desc).encode()
    return struct.pack(">I", len(body)) + body


def _attach_desc(vm_id: str) -> dict[str, Any]:
    return {
        "version": 1,
        "type": "attach",
        "vm_id": vm_id,
        "mode": "uffd",
        "vmm_pid": os.getpid(),
        "regions": [
            {"base_host_virt_addr": 0x7F00_0000_0000, "size": 16 * 4096, "offset": 0, "page_size": 4096}
        ],
    }


async def test_handoff_refuses_a_newline_vm_id(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        path = s.agent.agent.settings.handoff_path()
        data, _ = await asyncio.to_thread(
            _handoff_exchange, path, [_frame(_attach_desc("acme.vm1\n"))], 0, 10
        )
        msg = decode_body(data[4 : 4 + decode_frame_length(data[:4])])
        assert msg["type"] == "error" and "invalid vm_id" in msg["error"], msg


# --- 10. handshake deadline ---------------------------------------------------------------------------------
async def test_trickling_handoff_peer_is_cut_at_the_handshake_deadline(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        path = s.agent.agent.settings.handoff_path()
        frame = _frame(_attach_desc("acme.slow"))
        # one byte every 0.2 s: each recv succeeds well within any per-read timeout; the whole
        # handshake would take ~60 s. The agent's deadline is 1 s (handshake_timeout_s).
        chunks = [frame[i : i + 1] for i in range(len(frame))]
        data, took = await asyncio.to_thread(_handoff_exchange, path, chunks, 0.2, 30)
        assert took < 15, f"the agent held a trickling handshake open for {took:.1f} s"
        msg = decode_body(data[4 : 4 + decode_frame_length(data[:4])])
        assert msg["type"] == "error" and "not completed within 1 s" in msg["error"], msg


# --- 4. tenant-safe inputs ----------------------------------------------------------------------------------
async def test_tenant_cannot_create_sim_vms_or_read_agent_files(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        for spec in (
            sim_vm("acme.x", workload="trace:/etc/shadow"),
            sim_vm("acme.y"),
            uffd_vm("acme.z", MiB, NODE_ID),
        ):
            spec.workload = spec.workload or "trace:/etc/shadow"
            e = await refused(
                s.stub.RegisterVm(cp.RegisterVmRequest(vm=spec, attach=True), metadata=md(ACME), timeout=5)
            )
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e.details()
            assert "operators" in (e.details() or "")
        # straight to the agent, with a tenant token it accepts
        e = await refused(
            s.agent_stub.AttachVm(
                apb.AttachVmRequest(vm_id="acme.x", memory_bytes=MiB, workload="trace:/etc/shadow"),
                metadata=md(ACME),
                timeout=5,
            )
        )
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        listed = await s.stub.ListVmStatus(cp.ListVmStatusRequest(), metadata=md(ADMIN), timeout=5)
        assert list(listed.vms) == []


async def test_admin_traces_only_from_trace_dir_capped_never_echoed(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        secret = tmp_path / "shadow"
        secret.write_text(SECRET + "\n")
        (s.traces / "misplaced-secret").write_text(SECRET + "\n")  # inside the dir, but not a trace
        (s.traces / "link").symlink_to(secret)
        (s.traces / "zero").symlink_to("/dev/zero")
        os.mkfifo(s.traces / "fifo")
        (s.traces / "big.csv").write_bytes(b"tick,page,op\n" + b"0,1,r\n" * (TRACE_CAP // 6 + 1))
        # a gzip bomb: 64 KiB on disk, 64 MiB once inflated (the review's was 6 MB -> 4.4 GB)
        (s.traces / "bomb.csv.gz").write_bytes(gzip.compress(b"tick,page,op\n" + b"0" * (64 * MiB)))
        (s.traces / "ok.csv").write_bytes(b"tick,page,op\n0,1,r\n1,2,w\n")
        cases = {
            f"trace:{secret}": "inside the agent's trace_dir",
            "trace:../shadow": "inside the agent's trace_dir",
            "trace:link": "inside the agent's trace_dir",
            "trace:zero": "inside the agent's trace_dir",
            "trace:/dev/zero": "inside the agent's trace_dir",
            "trace:fifo": "not a regular file",
            "trace:misplaced-secret": "expected the header",
            "trace:big.csv": f"more than {TRACE_CAP} bytes",
            "trace:bomb.csv.gz": f"decompresses to more than {TRACE_CAP} bytes",
        }
        for i, (workload, why) in enumerate(cases.items()):
            e = await refused(
                s.stub.RegisterVm(
                    cp.RegisterVmRequest(vm=sim_vm(f"lab.t{i}", workload=workload), attach=True),
                    metadata=md(ADMIN),
                    timeout=20,
                )
            )
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (workload, e.code(), e.details())
            assert why in (e.details() or ""), (workload, e.details())
            assert "S3CRET" not in (e.details() or "") and "root:" not in (e.details() or "")
        # the facility still works for what it is for
        st = await s.stub.RegisterVm(
            cp.RegisterVmRequest(vm=sim_vm("lab.ok", workload="trace:ok.csv"), attach=True),
            metadata=md(ADMIN),
            timeout=10,
        )
        assert st.status.vm_id == "lab.ok"


async def test_vm_sizes_are_bounded_by_declared_node_capacity(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        nodes = (await s.stub.ListNodes(cp.ListNodesRequest(), metadata=md(ADMIN), timeout=5)).nodes
        assert [n.capacity_bytes for n in nodes] == [CAPACITY]  # the agent declares its capacity
        for node_id, cap in (("free", 0), ("small", 8 * MiB)):
            await s.stub.RegisterNode(
                cp.RegisterNodeRequest(
                    node=cp.NodeInfo(node_id=node_id, address="127.0.0.1:9", capacity_bytes=cap)
                ),
                metadata=md(ADMIN),
                timeout=5,
            )
        # capacity 0 ("not declared") is not unlimited for a tenant
        e = await refused(
            s.stub.RegisterVm(
                cp.RegisterVmRequest(vm=uffd_vm("acme.big", 64 << 30, "free")), metadata=md(ACME), timeout=5
            )
        )
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "declares no capacity" in (
            e.details() or ""
        )
        e = await refused(
            s.stub.RegisterVm(
                cp.RegisterVmRequest(vm=uffd_vm("acme.big", 16 * MiB, "small")), metadata=md(ACME), timeout=5
            )
        )
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "capacity left" in (e.details() or "")
        await s.stub.RegisterVm(
            cp.RegisterVmRequest(vm=uffd_vm("acme.fits", 8 * MiB, "small")), metadata=md(ACME), timeout=5
        )
        # the agent bounds a sim VM by its capacity too (64 GiB on a 64 MiB node)
        e = await refused(
            s.agent_stub.AttachVm(
                apb.AttachVmRequest(vm_id="lab.huge", memory_bytes=64 << 30, synthetic=True),
                metadata=md(AGENT),
                timeout=5,
            )
        )
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "capacity" in (e.details() or "")


# --- 5. fair scheduling --------------------------------------------------------------------------------------
async def test_tenant_manual_cycles_cannot_starve_another_tenants_schedule(tmp_path: Path) -> None:
    async with stack(
        tmp_path,
        scheduler=True,
        max_concurrent_cycles_per_node=2,
        tenant_manual_cycles=2,
        tenant_manual_max_interval_ms=3000,
    ) as s:
        admin = md(ADMIN)
        await s.stub.SetPolicy(
            cp.SetPolicyRequest(
                scope=cp.PolicyScope(fleet=True), policy=t.EvictionPolicy(paused=True), fields=["paused"]
            ),
            metadata=admin,
            timeout=5,
        )
        vms = [f"acme.vm{i}" for i in range(6)] + ["globex.db"]
        for vm in vms:
            await s.stub.RegisterVm(
                cp.RegisterVmRequest(vm=sim_vm(vm), attach=True), metadata=admin, timeout=10
            )
        await s.stub.SetPolicy(
            cp.SetPolicyRequest(
                scope=cp.PolicyScope(vm_id="globex.db"),
                policy=t.EvictionPolicy(paused=False, interval_ms=200),
                fields=["paused", "interval_ms"],
            ),
            metadata=admin,
            timeout=5,
        )

        # the review's attack, scaled to this node: more long manual cycles than the node has slots
        calls = [
            asyncio.ensure_future(
                s.stub.TriggerCycle(
                    cp.TriggerCycleRequest(vm_id=vm, mode=t.CYCLE_MODE_DETECT, interval_ms=3000),
                    metadata=md(ACME),
                    timeout=30,
                )
            )
            for vm in vms[:6]
        ]
        await asyncio.sleep(0.5)
        t0 = time.time() * 1000
        await asyncio.sleep(2.0)
        t1 = time.time() * 1000
        results = await asyncio.gather(*calls, return_exceptions=True)
        reports = (
            await s.stub.ListCycleReports(
                cp.ListCycleReportsRequest(vm_id="globex.db", limit=1000), metadata=admin, timeout=5
            )
        ).reports
        during = [r for r in reports if t0 <= r.started_unix_ms <= t1]
        assert len(during) >= 2, f"globex's 200 ms schedule got {len(during)} cycles while acme's ran"

        done = [r for r in results if isinstance(r, t.CycleReport)]
        exhausted = [
            r
            for r in results
            if isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ]
        assert len(done) == 2 and len(exhausted) == 4, results
        assert "already runs 2 manual cycle" in (exhausted[0].details() or "")
        # and a manual cycle of a tenant cannot hold a slot for the policy maximum (7 days)
        e = await refused(
            s.stub.TriggerCycle(
                cp.TriggerCycleRequest(
                    vm_id="acme.vm0", mode=t.CYCLE_MODE_DETECT, interval_ms=7 * 24 * 3600 * 1000
                ),
                metadata=md(ACME),
                timeout=5,
            )
        )
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 3000 ms" in (e.details() or "")


async def test_tenant_run_cycles_straight_to_the_agent_are_limited_too(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        vms = [f"acme.vm{i}" for i in range(4)]
        for vm in vms:
            await s.stub.RegisterVm(
                cp.RegisterVmRequest(vm=sim_vm(vm), attach=True), metadata=md(ADMIN), timeout=10
            )
        week = 7 * 24 * 3600 * 1000
        e = await refused(
            s.agent_stub.RunCycle(
                apb.RunCycleRequest(vm_id="acme.vm0", mode=t.CYCLE_MODE_DETECT, interval_ms=week),
                metadata=md(ACME),
                timeout=5,
            )
        )
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in (e.details() or "")
        calls = [
            asyncio.ensure_future(
                s.agent_stub.RunCycle(
                    apb.RunCycleRequest(vm_id=vm, mode=t.CYCLE_MODE_DETECT, interval_ms=1500),
                    metadata=md(ACME),
                    timeout=30,
                )
            )
            for vm in vms
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        done = [r for r in results if isinstance(r, t.CycleReport)]
        exhausted = [
            r
            for r in results
            if isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ]
        assert len(done) == 2 and len(exhausted) == 2, results
        # the admin (the control plane's token) is not limited
        await s.agent_stub.RunCycle(
            apb.RunCycleRequest(vm_id="acme.vm0", mode=t.CYCLE_MODE_DETECT, interval_ms=100),
            metadata=md(AGENT),
            timeout=10,
        )
