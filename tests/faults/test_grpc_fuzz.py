"""Fuzzing every gRPC request of the NodeAgent and ControlPlane services against running servers.

A real sim agent and a real control plane (SQLite state, scheduler off so the
state only changes on requests) serve on loopback from a loop thread. For each
method, Hypothesis builds request messages from the method's descriptor (every
field unset or drawn from its whole range, plus meaningful values: existing VM
ids, the real store name, page-aligned sizes) and also sends raw random bytes.

For every request:

* the server answers with a status code, never UNKNOWN (an unhandled exception)
  or UNIMPLEMENTED (INTERNAL only for bytes that are not a message at all);
* a request that fails (any code but OK and DEADLINE_EXCEEDED, which may have
  been valid and slow) changes nothing: the agent's VMs (state, policy, pages,
  evicted pages), the control plane's nodes, VMs, policies and successful
  cycle reports are the same before and after;
* after a request that succeeds, the baseline (node n1, VMs vm-a, vm-b, solo)
  is restored so that later requests keep hitting real objects.

At the end both servers still answer their health checks and list calls.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from tests.faults.common import LoopThread, fuzz_settings, record
from tests.faults.proto_strategies import message_strategy
from tests.helpers.wait import wait_until
from tiermem.agent.server import RunningAgent, serve_agent
from tiermem.api import NodeInfo, PolicyScope, VmSpec
from tiermem.config import AgentSettings, ControlPlaneSettings
from tiermem.control.server import RunningControlPlane, serve_control_plane
from tiermem.errors import TiermemError
from tiermem.model import Backend, EvictionCap, EvictionPolicy
from tiermem.rpc.clients import ControlPlaneClient
from tiermem.v1 import agent_pb2, control_pb2, types_pb2

pytestmark = pytest.mark.timeout(600)

PS = 4096
BASE_VMS = ("vm-a", "vm-b")
SOLO = "solo"
POLICY_FIELDS = [f.name for f in dataclasses.fields(EvictionPolicy)]
OK, DEADLINE = grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED}

AGENT = agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"]
CONTROL = control_pb2.DESCRIPTOR.services_by_name["ControlPlane"]
METHODS = [(AGENT, m) for m in AGENT.methods] + [(CONTROL, m) for m in CONTROL.methods]
TOTALS: dict[str, int] = {"requests": 0, "rejected": 0, "accepted": 0, "deadline": 0, "raw": 0}


def _hints(agent_address: str) -> dict[str, st.SearchStrategy[Any]]:
    """Meaningful values per field name: existing objects, valid and boundary sizes."""
    ids = st.sampled_from([*BASE_VMS, SOLO, "ghost", "n1", "", "a" * 65, "../etc", "vm a", "-x"])
    return {
        "vm_id": ids,
        "node_id": st.sampled_from(["n1", "n2", "", "n1 ", "N" * 70]),
        "address": st.sampled_from([agent_address, "127.0.0.1:1", "", "nohost", "[::1]:99999"]),
        "store": st.sampled_from(["default", "nope", "", "Default"]),
        "workload": st.sampled_from(
            [
                "idle",
                "uniform",
                "hotset:0.1",
                "zipf:1.1",
                "zipf:-1",
                "hotset:2",
                "scan:batch=0",
                "trace:/nonexistent",
                "nope",
            ]
        ),
        "selector": st.sampled_from(["tier=web", "tier!=web", "a=b,c=d", "=", "tier=", "", ",", "k in (a)"]),
        "value": st.sampled_from(["vm-a", "tier=web", "", "x=y"]),
        "fields": st.sampled_from([*POLICY_FIELDS, "nope", ""]),
        # sim VMs allocate real (lazily committed) memory: valid sizes stay small; the other sizes are invalid
        "memory_bytes": st.one_of(
            st.integers(1, 64).map(lambda n: n * PS),
            st.integers(1, 1 << 30),
            st.sampled_from([0, 4095, (64 << 30) + PS, 2**64 - 1]),
        ),
        "vcpus": st.sampled_from([0, 1, 2, 65, 2**32 - 1]),
        "interval_ms": st.sampled_from(
            [0, 1, 20, 7 * 24 * 3600 * 1000, 7 * 24 * 3600 * 1000 + 1, 2**63, 2**64 - 1]
        ),
        "cold_after": st.sampled_from([0, 1, 3, 250, 251, 2**32 - 1]),
        "fraction": st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1, float("nan"), float("inf")]),
        "after_seq": st.sampled_from([0, 1, 2**64 - 1]),
        "limit": st.sampled_from([0, 1, 1000, 1001, 2**32 - 1]),
    }


@dataclasses.dataclass(repr=False)
class Stack:
    loop: LoopThread
    agent: RunningAgent
    cp: RunningControlPlane
    channels: dict[str, grpc.Channel]
    client: ControlPlaneClient
    strategies: dict[str, st.SearchStrategy[Any]]

    def __repr__(self) -> str:
        return f"Stack(agent={self.agent.address}, cp={self.cp.address})"

    # --- state --------------------------------------------------------------------------------------
    def snapshot(self) -> tuple[Any, ...]:
        """What a failed request must not change (dynamic counters and timestamps left out)."""
        a = self.agent.agent
        vms = sorted(
            (
                s.vm_id,
                s.state.value,
                s.total_pages,
                s.evicted_pages,
                tuple(sorted(s.labels.items())),
                s.policy,
            )
            for s in a.list_status()
        )
        c = self.client
        nodes = sorted(
            (n.node_id, n.address, n.backends, n.capacity_bytes, n.max_concurrent_cycles, n.evict_mbps)
            for n in c.list_nodes()
        )
        cvms = sorted((v.vm_id, v.node_id, tuple(sorted(v.labels.items()))) for v in c.list_vm_status())
        pols = sorted(((p.scope.key, p.policy) for p in c.list_policies()), key=lambda x: x[0])
        reports = sorted(
            (r.vm_id, r.cycle, r.started_unix_ms) for r in c.list_cycle_reports(limit=1000) if not r.error
        )
        return vms, nodes, cvms, pols, reports

    def settle(self) -> None:
        """Wait for any cycle or drain a timed-out request left running on the agent."""
        a = self.agent.agent
        wait_until(
            lambda: not any(s.cycle_lock.locked() for s in list(a.sessions.values())), 30, "cycles to end"
        )

    def restore(self) -> None:
        """Bring back the baseline objects a successful request may have removed; drop extra ones."""
        self.settle()
        a, c = self.agent.agent, self.client
        c.register_node(NodeInfo("n1", self.agent.address, backends=(Backend.SIM,)))
        registered = {v.vm_id for v in c.list_vm_status()}
        for vm in registered - set(BASE_VMS):
            try:
                c.deregister_vm(vm, purge=True)
            except TiermemError:
                pass
        for vm, sess in list(a.sessions.items()):
            # extra VMs go; so do baseline VMs a request re-attached with vCPU threads (their memory moves)
            if vm not in (*BASE_VMS, SOLO) or int(getattr(sess.guest, "vcpus", 0)) > 0:
                a.detach(vm, purge=True)
        for vm in BASE_VMS:
            if vm not in registered:
                c.register_vm(
                    VmSpec(vm, "n1", 64 * PS, labels={"tier": "web"}, workload="uniform"), attach=True
                )
            elif vm not in a.sessions:
                a.attach_sim(vm, 64 * PS, EvictionPolicy(), {"tier": "web"}, workload="uniform", vcpus=0)
        if SOLO not in a.sessions:
            # no vCPU threads: the guest's memory only changes when a request says so
            a.attach_sim(
                SOLO, 64 * PS, EvictionPolicy(interval_ms=20, cold_after=1), workload="uniform", vcpus=0
            )

    # --- calls ---------------------------------------------------------------------------------------
    def call(
        self, service: str, m: MethodDescriptor, payload: bytes, timeout: float | None = -1.0
    ) -> grpc.StatusCode:
        """Send ``payload`` as the request of ``m``; return the final status code."""
        path = f"/{m.containing_service.full_name}/{m.name}"
        ch: Any = self.channels[service]  # raw bytes in and out: no (de)serializers
        if timeout is not None and timeout < 0:
            timeout = 0.5 if m.name == "StreamEvents" else 2.0 if "Cycle" in m.name else 5.0
        try:
            if m.server_streaming:
                for _ in ch.unary_stream(path)(payload, timeout=timeout):
                    pass
            else:
                ch.unary_unary(path)(payload, timeout=timeout)
            return OK
        except grpc.RpcError as e:
            return e.code()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    loop = LoopThread()
    agent = loop.run(
        serve_agent(
            AgentSettings(
                node_id="n1",
                listen="127.0.0.1:0",
                data_dir=str(tmp / "agent"),
                stores={"default": "memory://"},
                autonomous=False,
                fsync=False,
                handoff_socket=str(tmp / "h" / "handoff.sock"),
            )
        )
    )
    cp = loop.run(
        serve_control_plane(
            ControlPlaneSettings(
                listen="127.0.0.1:0",
                state=f"sqlite:///{tmp}/cp.db",
                scheduler=False,
                replica_id="r1",
                lease_ttl_ms=3_600_000,
                jitter=0.0,
            )
        )
    )
    channels = {
        "NodeAgent": grpc.insecure_channel(agent.address),
        "ControlPlane": grpc.insecure_channel(cp.address),
    }
    client = ControlPlaneClient(cp.address, timeout_s=30)
    hints = _hints(agent.address)
    strategies = {f"{svc.name}.{m.name}": message_strategy(m.input_type, hints) for svc, m in METHODS}
    s = Stack(loop, agent, cp, channels, client, strategies)
    s.restore()
    client.set_policy(PolicyScope.fleet(), EvictionPolicy(interval_ms=20, cold_after=2))
    client.set_policy(
        PolicyScope.for_selector("tier=web"),
        EvictionPolicy(interval_ms=20, prefetch_pages=4),
        ["prefetch_pages"],
    )
    client.set_policy(
        PolicyScope.for_vm("vm-a"),
        EvictionPolicy(interval_ms=20, cold_after=1, max_evict=EvictionCap(pages=8)),
    )
    yield s
    # the servers survived: health, list calls, and one valid request of each kind still work
    for ch in channels.values():
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
    assert {v.vm_id for v in client.list_vm_status()} >= set(BASE_VMS)
    record(
        "gRPC request fuzzing (NodeAgent + ControlPlane)", pages_verified=0, pages_lost=0, crashes=0, **TOTALS
    )
    client.close()
    for ch in channels.values():
        ch.close()
    loop.run(cp.stop())
    loop.run(agent.stop())
    loop.close()


def _parses(m: MethodDescriptor, payload: bytes) -> bool:
    try:
        GetMessageClass(m.input_type).FromString(payload)
        return True
    except DecodeError:
        return False


def _check(stack: Stack, service: str, m: MethodDescriptor, payload: bytes, raw: bool) -> None:
    before = stack.snapshot()
    code = stack.call(service, m, payload)
    TOTALS["requests"] += 1
    TOTALS["raw"] += raw
    if raw and not _parses(m, payload):
        # grpc.aio answers bytes that are not a request message at all with UNKNOWN (its own DecodeError
        # path, before any tiermem code runs); any code is fine as long as nothing changed
        assert code != OK, f"{m.name} accepted bytes that are not a {m.input_type.name}: {payload!r}"
    else:
        assert code not in NEVER, f"{m.name}: {code} (an unhandled server error) for {payload!r}"
        assert code != grpc.StatusCode.INTERNAL, f"{m.name}: INTERNAL for a well-formed request {payload!r}"
    if code == OK:
        TOTALS["accepted"] += 1
        stack.restore()
        return
    if code == DEADLINE:
        TOTALS["deadline"] += 1
        stack.settle()
        return
    TOTALS["rejected"] += 1
    after = stack.snapshot()
    diff = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
    assert not diff, f"{m.name} failed with {code} but changed the state {diff}; request {payload!r}"


@pytest.mark.parametrize(("svc", "method"), METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS])
@fuzz_settings(25, 400)
@given(data=st.data())
def test_fuzzed_requests_get_a_status_and_change_nothing_when_refused(
    stack: Stack, svc: Any, method: MethodDescriptor, data: st.DataObject
) -> None:
    msg = data.draw(stack.strategies[f"{svc.name}.{method.name}"], label="request")
    _check(stack, svc.name, method, msg.SerializeToString(), raw=False)


@pytest.mark.parametrize("svc", [AGENT, CONTROL], ids=["NodeAgent", "ControlPlane"])
@fuzz_settings(60, 1000)
@given(data=st.data())
def test_random_bytes_as_requests(stack: Stack, svc: Any, data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(list(svc.methods)), label="method")
    payload = data.draw(st.binary(max_size=256), label="bytes")
    _check(stack, svc.name, method, payload, raw=True)


def test_an_invalid_cycle_interval_leaves_the_policy_alone(stack: Stack) -> None:
    """A RunCycle with a valid new policy but an out-of-range interval and no deadline must not install the policy."""
    a = stack.agent.agent
    stack.restore()
    before = a.sessions[SOLO].policy
    req = agent_pb2.RunCycleRequest(vm_id=SOLO, interval_ms=7 * 24 * 3600 * 1000 + 1)
    req.policy.interval_ms, req.policy.cold_after, req.policy.prefetch_pages = 20, 9, 3
    t = time.monotonic()
    code = stack.call("NodeAgent", AGENT.methods_by_name["RunCycle"], req.SerializeToString(), timeout=None)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and time.monotonic() - t < 5
    assert a.sessions[SOLO].policy == before


def test_event_replay_after_a_huge_seq(stack: Stack) -> None:
    req = types_pb2.StreamEventsRequest(after_seq=2**64 - 1)
    code = stack.call("ControlPlane", CONTROL.methods_by_name["StreamEvents"], req.SerializeToString())
    assert code == OK  # no event has such a seq: an empty replay


def test_a_sim_vm_too_big_for_this_host_gets_a_clear_error(stack: Stack) -> None:
    req = agent_pb2.AttachVmRequest(vm_id="big", memory_bytes=64 << 30, workload="idle")
    code = stack.call("NodeAgent", AGENT.methods_by_name["AttachVm"], req.SerializeToString())
    assert code not in NEVER, code
    assert "big" not in stack.agent.agent.sessions or code == OK
