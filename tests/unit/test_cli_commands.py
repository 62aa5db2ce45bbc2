"""CLI commands against a stub control-plane client: flag parsing, JSON shapes, exit codes.

The unit tier injects a recording stub through ``obj['client_factory']``; the
integration tier (tests/integration/test_cli_live.py) runs the same commands
against a real control plane and agent.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tiermem import errors
from tiermem.api import EffectivePolicy, NodeInfo, PolicyEntry, PolicyScope, ScopeKind, VmSpec
from tiermem.cli.main import cli
from tiermem.config import ClientSettings
from tiermem.model import (
    Backend,
    Compression,
    CycleMode,
    CycleReport,
    DrainProgress,
    Event,
    EventKind,
    EvictionCap,
    EvictionPolicy,
    PhaseTimes,
    StoreUsage,
    VmStatus,
)


class StubClient:
    """Records calls and answers with fixed domain objects; ``fail_with`` makes every call raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail_with: BaseException | None = None
        self.drain_steps = [
            DrainProgress("vm1", 10, 0),
            DrainProgress("vm1", 10, 6),
            DrainProgress("vm1", 10, 10, True),
        ]
        self.closed = False
        self.status = VmStatus(
            "vm1",
            node_id="n1",
            total_pages=1024,
            resident_pages=700,
            evicted_pages=324,
            working_set_pages=100,
            faults_served=7,
            promotion_rate=0.001,
            labels={"tier": "web"},
            cycles=4,
            store_usage=StoreUsage("default", "file", "file:///tmp/p", 300, 24, 600_000, 1_228_800),
        )
        self.report = CycleReport(
            "vm1",
            cycle=5,
            pages_scanned=1024,
            pages_hot=100,
            pages_cold=200,
            pages_evicted=150,
            phases=PhaseTimes(scan_us=1500, total_us=9000),
            node_id="n1",
        )

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.fail_with is not None:
            raise self.fail_with

    def close(self) -> None:
        self.closed = True

    def set_policy(self, scope: PolicyScope, policy: EvictionPolicy, fields: list[str]) -> PolicyEntry:
        self._call("set_policy", scope, policy, fields)
        return PolicyEntry(scope, dataclasses.replace(policy, version=3), updated_ms=1_700_000_000_000)

    def get_policy(self, vm_id: str) -> EffectivePolicy:
        self._call("get_policy", vm_id)
        return EffectivePolicy(
            EvictionPolicy(cold_after=6, version=2), PolicyScope.for_selector("tier=web"), True
        )

    def list_policies(self, selector: str = "") -> list[PolicyEntry]:
        self._call("list_policies", selector)
        return [
            PolicyEntry(PolicyScope.fleet(), EvictionPolicy(version=1), 1),
            PolicyEntry(PolicyScope.for_vm("vm1"), EvictionPolicy(max_evict=EvictionCap(fraction=0.2)), 2),
        ]

    def delete_policy(self, scope: PolicyScope) -> None:
        self._call("delete_policy", scope)

    def list_vm_status(self, node_id: str = "", selector: str = "") -> list[VmStatus]:
        self._call("list_vm_status", node_id, selector)
        return [self.status, VmStatus("vm2", node_id="n2", node_up=False)]

    def get_vm_status(self, vm_id: str) -> VmStatus:
        self._call("get_vm_status", vm_id)
        return self.status

    def list_cycle_reports(self, vm_id: str = "", limit: int = 0) -> list[CycleReport]:
        self._call("list_cycle_reports", vm_id, limit)
        return [self.report]

    def register_vm(self, spec: VmSpec, attach: bool = False) -> VmStatus:
        self._call("register_vm", spec, attach)
        return VmStatus(
            spec.vm_id, node_id=spec.node_id, total_pages=spec.memory_bytes // 4096, labels=spec.labels
        )

    def deregister_vm(self, vm_id: str, purge: bool = False) -> int:
        self._call("deregister_vm", vm_id, purge)
        return 42 if purge else 0

    def drain_vm(self, vm_id: str) -> Iterator[DrainProgress]:
        self._call("drain_vm", vm_id)
        yield from self.drain_steps

    def trigger_cycle(self, vm_id: str, mode: CycleMode, interval_ms: int = 0) -> CycleReport:
        self._call("trigger_cycle", vm_id, mode, interval_ms)
        return dataclasses.replace(
            self.report, mode=mode, pages_evicted=0 if mode is CycleMode.DETECT else 150
        )

    def list_nodes(self) -> list[NodeInfo]:
        self._call("list_nodes")
        return [NodeInfo("n1", "127.0.0.1:7070", backends=(Backend.SIM, Backend.UFFD), vms=1)]

    def stream_events(self, vm_id: str = "", after_seq: int = 0, follow: bool = False) -> Iterator[Event]:
        self._call("stream_events", vm_id, after_seq, follow)
        yield Event(
            EventKind.CYCLE_COMPLETED,
            "cycle 5 evicted 150 pages",
            vm_id="vm1",
            seq=1,
            attributes={"cycle": "5"},
        )
        yield Event(EventKind.NODE_DOWN, "node n2 missed its lease", node_id="n2", seq=2)


@pytest.fixture
def stub() -> StubClient:
    return StubClient()


def run(
    stub: StubClient,
    *args: str,
    env: dict[str, str] | None = None,
    settings_out: list[ClientSettings] | None = None,
) -> Result:
    def factory(settings: ClientSettings) -> StubClient:
        if settings_out is not None:
            settings_out.append(settings)
        return stub

    return CliRunner().invoke(
        cli, list(args), obj={"client_factory": factory}, env=env or {"TIERMEM_SERVER": None}
    )


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def one_line_error(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tiermem: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def field_names(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# --- policy ---------------------------------------------------------------------------------------


def test_policy_set_sends_only_the_given_fields(stub: StubClient) -> None:
    r = ok(
        run(
            stub,
            "policy",
            "set",
            "vm1",
            "--interval",
            "500ms",
            "--max-evict",
            "20%",
            "--slo",
            "0.2%/min",
            "--compression",
            "zstd",
            "--pause",
        )
    )
    (name, (scope, pol, fields)), *_ = stub.calls
    assert name == "set_policy"
    assert scope == PolicyScope(ScopeKind.VM, "vm1")
    assert fields == ["compression", "interval_ms", "max_evict", "paused", "slo_promotion_rate"]
    assert pol.interval_ms == 500
    assert pol.max_evict == EvictionCap(fraction=0.2)
    assert pol.slo_promotion_rate == pytest.approx(0.002)
    assert pol.compression is Compression.ZSTD
    assert pol.paused is True
    assert "version 3" in r.stdout
    assert stub.closed


def test_policy_set_every_flag(stub: StubClient) -> None:
    ok(
        run(
            stub,
            "policy",
            "set",
            "--selector",
            "tier=web, zone=a",
            "--cold-after",
            "5",
            "--min-resident",
            "1GiB",
            "--store",
            "redis",
            "--prefetch",
            "0",
            "--max-evict",
            "1000pages",
            "--resume",
        )
    )
    _, (scope, pol, fields) = stub.calls[0]
    assert scope == PolicyScope(ScopeKind.SELECTOR, "tier=web,zone=a")
    assert set(fields) == {
        "cold_after",
        "min_resident_bytes",
        "store",
        "prefetch_pages",
        "max_evict",
        "paused",
    }
    assert (pol.cold_after, pol.min_resident_bytes, pol.store, pol.prefetch_pages) == (5, 1 << 30, "redis", 0)
    assert pol.max_evict == EvictionCap(pages=1000)
    assert pol.paused is False


def test_policy_set_fleet_json(stub: StubClient) -> None:
    r = ok(run(stub, "policy", "set", "--fleet", "--max-evict", "none", "--json"))
    _, (scope, pol, fields) = stub.calls[0]
    assert scope == PolicyScope.fleet()
    assert fields == ["max_evict"] and pol.max_evict == EvictionCap()
    doc = json.loads(r.stdout)
    assert set(doc) == {"scope", "policy", "updated_ms"}
    assert doc["scope"] == {"kind": "fleet", "value": ""}
    assert set(doc["policy"]) == field_names(EvictionPolicy)
    assert doc["policy"]["max_evict"] == {"pages": None, "bytes": None, "fraction": None}
    assert doc["policy"]["compression"] == "none"
    assert doc["policy"]["version"] == 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["vm1", "--interval", "abc"], "--interval: invalid duration 'abc': use e.g. 500ms, 30s, 2m, 1h"),
        (["vm1", "--interval", "0s"], "--interval: must be > 0"),
        (["vm1", "--interval", "8d"], "--interval"),
        (["vm1", "--interval", "200h"], "--interval: must be > 0 and at most 7 days"),
        (["vm1", "--cold-after", "0"], "--cold-after: must be between 1 and 250"),
        (["vm1", "--cold-after", "251"], "--cold-after: must be between 1 and 250"),
        (["vm1", "--cold-after", "x"], "--cold-after"),
        (["vm1", "--max-evict", "20"], "--max-evict: eviction cap '20' needs a unit"),
        (["vm1", "--max-evict", "150%"], "--max-evict"),
        (["vm1", "--min-resident", "1XB"], "--min-resident: invalid size '1XB'"),
        (["vm1", "--prefetch", "513"], "--prefetch: must be between 0 and 512"),
        (["vm1", "--prefetch", "-1"], "--prefetch"),
        (["vm1", "--slo", "5%/s"], "--slo: rate '5%/s' must be between"),
        (["vm1", "--compression", "gzip"], "--compression"),
        (["vm1", "--store", "bad name"], "--store: invalid store name"),
        (["bad/id", "--cold-after", "2"], "VM: invalid VM id 'bad/id'"),
        (["--selector", "tier", "--cold-after", "2"], "--selector: invalid selector term"),
        (["vm1", "--fleet", "--cold-after", "2"], "name exactly one target"),
        (["--cold-after", "2"], "name exactly one target"),
        (["vm1"], "nothing to set"),
        (["vm1", "--bogus"], "No such option"),
    ],
)
def test_policy_set_invalid_input_is_one_line_exit_1(stub: StubClient, args: list[str], needle: str) -> None:
    line = one_line_error(run(stub, "policy", "set", *args))
    assert needle in line
    assert not stub.calls, "nothing may reach the server on invalid input"


def test_policy_get_json_and_table(stub: StubClient) -> None:
    doc = json.loads(ok(run(stub, "policy", "get", "vm1", "--json")).stdout)
    assert set(doc) == {"vm_id", "policy", "source", "adjusted"}
    assert doc["source"] == {"kind": "selector", "value": "tier=web"}
    assert doc["adjusted"] is True and doc["policy"]["cold_after"] == 6
    out = ok(run(stub, "policy", "get", "vm1")).stdout
    assert "selector/tier=web" in out and "adjusted" in out and "6 cycles" in out


def test_policy_list_and_unset(stub: StubClient) -> None:
    doc = json.loads(ok(run(stub, "policy", "list", "--selector", "tier=web", "--json")).stdout)
    assert stub.calls[0] == ("list_policies", ("tier=web",))
    assert [e["scope"]["kind"] for e in doc] == ["fleet", "vm"]
    assert doc[1]["policy"]["max_evict"]["fraction"] == 0.2
    out = ok(run(stub, "policy", "list")).stdout
    assert "vm/vm1" in out and "20%" in out
    ok(run(stub, "policy", "unset", "--selector", "zone=a,tier=web"))
    assert stub.calls[-1] == ("delete_policy", (PolicyScope(ScopeKind.SELECTOR, "tier=web,zone=a"),))
    one_line_error(run(stub, "policy", "unset"))


# --- vm --------------------------------------------------------------------------------------------


def test_vm_list_json_has_every_status_field(stub: StubClient) -> None:
    doc = json.loads(ok(run(stub, "vm", "list", "--node", "n1", "--selector", "tier=web", "--json")).stdout)
    assert stub.calls[0] == ("list_vm_status", ("n1", "tier=web"))
    assert isinstance(doc, list) and len(doc) == 2
    assert set(doc[0]) == field_names(VmStatus)
    assert doc[0]["state"] == "attached" and doc[0]["backend"] == "sim"
    assert set(doc[0]["store_usage"]) == field_names(StoreUsage)
    assert set(doc[0]["policy"]) == field_names(EvictionPolicy)
    out = ok(run(stub, "vm", "list")).stdout
    assert "vm1" in out and "vm2" in out and "(down)" in out


def test_vm_show(stub: StubClient) -> None:
    doc = json.loads(ok(run(stub, "vm", "show", "vm1", "--json")).stdout)
    assert set(doc) == field_names(VmStatus) | {"last_cycles"}
    assert doc["evicted_pages"] == 324
    assert set(doc["last_cycles"][0]) == field_names(CycleReport)
    assert ("list_cycle_reports", ("vm1", 5)) in stub.calls
    out = ok(run(stub, "vm", "show", "vm1")).stdout
    for needle in (
        "working set",
        "resident",
        "evicted",
        "faults served",
        "promotion rate",
        "store usage",
        "tier=web",
        "cycle",
    ):
        assert needle in out


def test_vm_register(stub: StubClient) -> None:
    doc = json.loads(
        ok(
            run(
                stub,
                "vm",
                "register",
                "vm9",
                "--node",
                "n1",
                "--memory",
                "64MiB",
                "--label",
                "a=b",
                "--label",
                "c=d",
                "--workload",
                "zipf",
                "--attach",
                "--json",
            )
        ).stdout
    )
    _, (spec, attach) = stub.calls[0]
    assert spec == VmSpec("vm9", "n1", 64 << 20, {"a": "b", "c": "d"}, Backend.SIM, "zipf")
    assert attach is True
    assert doc["vm_id"] == "vm9" and doc["total_pages"] == 16384


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["vm9", "--node", "n1", "--memory", "1000"], "--memory: must be a positive multiple of 4096"),
        (["vm9", "--node", "n1", "--memory", "lots"], "--memory: invalid memory size"),
        (["vm9", "--node", "n1", "--memory", "1G", "--label", "novalue"], "--label: invalid label 'novalue'"),
        (
            ["vm9", "--node", "n1", "--memory", "1G", "--label", "a=b", "--label", "a=c"],
            "--label: 'a' given twice",
        ),
        (["vm9", "--node", "n 1", "--memory", "1G"], "--node: invalid node id"),
        (["vm9", "--memory", "1G"], "Missing option '--node'"),
        (["vm9", "--node", "n1", "--memory", "1G", "--backend", "uffd", "--workload", "zipf"], "--workload"),
    ],
)
def test_vm_register_invalid(stub: StubClient, args: list[str], needle: str) -> None:
    assert needle in one_line_error(run(stub, "vm", "register", *args))
    assert not stub.calls


def test_vm_drain_progress_and_json(stub: StubClient) -> None:
    out = ok(run(stub, "vm", "drain", "vm1")).stdout
    assert "10 of 10 pages restored" in out
    lines = ok(run(stub, "vm", "drain", "vm1", "--json")).stdout.strip().splitlines()
    docs = [json.loads(x) for x in lines]
    assert [d["pages_restored"] for d in docs] == [0, 6, 10]
    assert docs[-1]["done"] is True and set(docs[0]) == field_names(DrainProgress)


def test_vm_drain_cut_short_is_unavailable(stub: StubClient) -> None:
    stub.drain_steps = stub.drain_steps[:2]
    assert "ended before it was done" in one_line_error(run(stub, "vm", "drain", "vm1"), 2)


def test_vm_deregister(stub: StubClient) -> None:
    out = ok(run(stub, "vm", "deregister", "vm1")).stdout
    assert stub.calls[-1] == ("deregister_vm", ("vm1", False)) and "drained" in out
    # --purge discards pages: refused without a confirmation when stdin is not a terminal.
    assert "--yes" in one_line_error(run(stub, "vm", "deregister", "vm1", "--purge"))
    assert stub.calls[-1] == ("deregister_vm", ("vm1", False))
    doc = json.loads(ok(run(stub, "vm", "deregister", "vm1", "--purge", "--yes", "--json")).stdout)
    assert stub.calls[-1] == ("deregister_vm", ("vm1", True))
    assert doc == {"vm_id": "vm1", "purged": True, "pages_purged": 42}


# --- cycles, nodes, events --------------------------------------------------------------------------


def test_cycle_run(stub: StubClient) -> None:
    doc = json.loads(ok(run(stub, "cycle", "run", "vm1", "--dry-run", "--interval", "5s", "--json")).stdout)
    assert stub.calls[0] == ("trigger_cycle", ("vm1", CycleMode.DETECT, 5000))
    assert set(doc) == field_names(CycleReport)
    assert doc["mode"] == "detect" and doc["pages_evicted"] == 0
    assert set(doc["phases"]) == field_names(PhaseTimes)
    out = ok(run(stub, "cycle", "run", "vm1")).stdout
    assert stub.calls[-1] == ("trigger_cycle", ("vm1", CycleMode.EVICT, 0))
    assert "phases (ms)" in out and "scan" in out and "1.50" in out
    assert "--interval" in one_line_error(run(stub, "cycle", "run", "vm1", "--interval", "soon"))


def test_cycle_history(stub: StubClient) -> None:
    doc = json.loads(ok(run(stub, "cycle", "history", "vm1", "--limit", "3", "--json")).stdout)
    assert stub.calls[0] == ("list_cycle_reports", ("vm1", 3))
    assert doc[0]["cycle"] == 5
    ok(run(stub, "cycle", "history"))
    assert stub.calls[-1] == ("list_cycle_reports", ("", 20))
    assert "--limit" in one_line_error(run(stub, "cycle", "history", "--limit", "0"))


def test_node_list(stub: StubClient) -> None:
    doc = json.loads(ok(run(stub, "node", "list", "--json")).stdout)
    assert set(doc[0]) == field_names(NodeInfo)
    assert doc[0]["backends"] == ["sim", "uffd"]
    assert "127.0.0.1:7070" in ok(run(stub, "node", "list")).stdout


def test_events(stub: StubClient) -> None:
    lines = ok(run(stub, "events", "--vm", "vm1", "--follow", "--json")).stdout.strip().splitlines()
    assert stub.calls[0] == ("stream_events", ("vm1", 0, True))
    docs = [json.loads(x) for x in lines]
    assert [d["kind"] for d in docs] == ["cycle_completed", "node_down"]
    assert set(docs[0]) == field_names(Event)
    out = ok(run(stub, "events")).stdout
    assert stub.calls[-1] == ("stream_events", ("", 0, False))
    assert "cycle_completed" in out and "vm=vm1" in out and "cycle=5" in out and "node=n2" in out


# --- connection options and error mapping -----------------------------------------------------------


def test_connection_options_reach_client_settings(stub: StubClient, tmp_path: Any) -> None:
    seen: list[ClientSettings] = []
    ok(
        run(
            stub,
            "--server",
            "10.0.0.1:1",
            "vm",
            "list",
            "--server",
            "127.0.0.1:7001",
            "--timeout",
            "2s",
            "--token",
            "t0k",
            settings_out=seen,
        )
    )
    assert seen[0].server == "127.0.0.1:7001"  # the later flag wins
    assert seen[0].timeout_s == 2.0 and seen[0].token == "t0k"
    ok(
        run(
            stub,
            "node",
            "list",
            env={"TIERMEM_SERVER": "127.0.0.1:7002", "TIERMEM_TOKEN": "envtok"},
            settings_out=seen,
        )
    )
    assert (seen[1].server, seen[1].token) == ("127.0.0.1:7002", "envtok")
    ok(
        run(
            stub,
            "node",
            "list",
            "--tls-ca",
            "/ca.pem",
            env={"TIERMEM_TLS__SERVER_NAME": "cp.local"},
            settings_out=seen,
        )
    )
    assert (seen[2].tls.ca_file, seen[2].tls.server_name) == ("/ca.pem", "cp.local")
    assert "--tls-key" in one_line_error(run(stub, "node", "list", "--tls-cert", "/c.pem"))
    assert "--timeout" in one_line_error(run(stub, "node", "list", "--timeout", "0s"))


@pytest.mark.parametrize(
    ("exc", "code", "needle"),
    [
        (
            errors.Unavailable("server unavailable: failed to connect to all addresses; last error: refused"),
            2,
            "control plane at 127.0.0.1:7999 is unreachable: failed to connect to all addresses",
        ),
        (
            errors.Unavailable("server unavailable: agent n1 is down"),
            2,
            "control plane at 127.0.0.1:7999 is unavailable",
        ),
        (errors.StoreUnavailable("redis timed out"), 2, "redis timed out"),
        (errors.FailedPrecondition("node n1 is down"), 3, "node n1 is down"),
        (errors.StoreFull("quota"), 3, "quota"),
        (errors.NotFound("unknown VM 'vm1'"), 1, "unknown VM 'vm1'"),
        (
            errors.InvalidArgument("unauthenticated: missing token\nsecond line"),
            1,
            "unauthenticated: missing token",
        ),
        (RuntimeError("boom"), 1, "internal error: RuntimeError: boom (run with --debug for a traceback)"),
    ],
)
def test_errors_map_to_exit_codes(stub: StubClient, exc: BaseException, code: int, needle: str) -> None:
    stub.fail_with = exc
    line = one_line_error(run(stub, "vm", "show", "vm1", "--server", "127.0.0.1:7999"), code)
    assert needle in line
    assert "second line" not in line


def test_deadline_exceeded_message(stub: StubClient) -> None:
    exc = errors.Unavailable("Deadline Exceeded")
    exc.code = type("Code", (), {"name": "DEADLINE_EXCEEDED"})()  # type: ignore[attr-defined]
    stub.fail_with = exc
    assert "did not answer in time" in one_line_error(run(stub, "node", "list", "--server", "h:1"), 2)


def test_debug_shows_the_exception(stub: StubClient) -> None:
    stub.fail_with = errors.FailedPrecondition("node down")
    r = run(stub, "--debug", "node", "list")
    assert isinstance(r.exception, errors.FailedPrecondition)


def test_bare_group_prints_help(stub: StubClient) -> None:
    r = ok(run(stub, "vm"))
    assert "deregister" in r.stdout and "drain" in r.stdout


def test_shell_completion_lists_commands() -> None:
    r = CliRunner().invoke(
        cli,
        [],
        prog_name="tiermem",
        env={"_TIERMEM_COMPLETE": "bash_complete", "COMP_WORDS": "tiermem po", "COMP_CWORD": "1"},
    )
    assert "policy" in r.stdout
    r = CliRunner().invoke(cli, [], prog_name="tiermem", env={"_TIERMEM_COMPLETE": "bash_source"})
    assert "_TIERMEM_COMPLETE=bash_complete" in r.stdout


def test_vm_ids_complete_from_the_server(stub: StubClient) -> None:
    env = {"_TIERMEM_COMPLETE": "bash_complete", "COMP_WORDS": "tiermem vm show v", "COMP_CWORD": "3"}
    r = CliRunner().invoke(cli, [], prog_name="tiermem", env=env, obj={"client_factory": lambda s: stub})
    assert r.stdout.split() == ["plain,vm1", "plain,vm2"]
    stub.fail_with = errors.Unavailable("down")  # an unreachable server completes nothing, silently
    r = CliRunner().invoke(cli, [], prog_name="tiermem", env=env, obj={"client_factory": lambda s: stub})
    assert r.exit_code == 0 and r.stdout.strip() == "" and r.stderr == ""


# ---------------------------------------------------------------- output formats (issue 20)


def test_tables_are_plain_ascii_off_a_terminal(stub: StubClient) -> None:
    out = ok(run(stub, "node", "list")).stdout
    assert "127.0.0.1:7070" in out
    assert out.isascii(), [c for c in out if not c.isascii()][:5]
    assert "|" in out and "-" in out


@pytest.mark.parametrize("cmd", [["node", "list"], ["vm", "list"]])
def test_output_json_is_the_json_flag(stub: StubClient, cmd: list[str]) -> None:
    assert json.loads(ok(run(stub, *cmd, "-o", "json")).stdout) == json.loads(
        ok(run(stub, *cmd, "--json")).stdout
    )


def test_output_wide_never_folds(stub: StubClient) -> None:
    env: dict[str, str | None] = {"COLUMNS": "40", "TIERMEM_SERVER": None}
    narrow = ok(run(stub, "node", "list", env=env)).stdout  # type: ignore[arg-type]
    wide = ok(run(stub, "node", "list", "-o", "wide", env=env)).stdout  # type: ignore[arg-type]
    assert len(wide.splitlines()) < len(narrow.splitlines())
    assert max(len(line) for line in wide.splitlines()) > 40


def test_output_and_json_must_agree(stub: StubClient) -> None:
    assert "disagree" in one_line_error(run(stub, "node", "list", "--json", "-o", "wide"))
    assert "yaml" in one_line_error(run(stub, "node", "list", "-o", "yaml"))


def test_drain_keep_paused_pauses_first(stub: StubClient) -> None:
    out = ok(run(stub, "vm", "drain", "vm1", "--keep-paused")).stdout
    names = [c[0] for c in stub.calls]
    assert names.index("set_policy") < names.index("drain_vm")
    scope, policy, fields = next(c[1] for c in stub.calls if c[0] == "set_policy")
    assert scope == PolicyScope.for_vm("vm1") and policy.paused is True and fields == ["paused"]
    assert "--resume" in out


def test_drain_without_keep_paused_changes_no_policy(stub: StubClient) -> None:
    ok(run(stub, "vm", "drain", "vm1"))
    assert "set_policy" not in [c[0] for c in stub.calls]


def _workload_examples() -> list[str]:
    """Every workload spec that a --workload help text shows (after "e.g." or as the default)."""
    import click

    from tiermem.cli.main import cli as root

    found: list[str] = []
    stack: list[click.Command] = [root]
    while stack:
        cmd = stack.pop()
        stack += list(getattr(cmd, "commands", {}).values())
        for p in cmd.params:
            if not (isinstance(p, click.Option) and "--workload" in p.opts):
                continue
            if isinstance(p.default, str) and p.default:
                found.append(p.default)
            helptext = p.help or ""
            if "e.g." in helptext:
                words = re.split(r",\s*|\s+or\s+", helptext.split("e.g.", 1)[1].strip().rstrip("."))
                found += [w for w in words if w]
    return found


def test_workload_help_examples_are_accepted() -> None:
    from tiermem.sim.workloads import parse_workload

    examples = _workload_examples()
    assert "zipf:1.1" in examples and "hotset:0.1" in examples
    for spec in examples:
        parse_workload(spec, 4096, 1)
