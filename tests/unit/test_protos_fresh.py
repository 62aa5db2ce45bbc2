"""The committed generated code must match the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True,
                   capture_output=True)  # fmt: skip
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "tiermem" / "v1").iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in (ROOT / "tiermem" / "v1").iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `make protos` and commit"


# The gRPC edge: servicers, server wiring, proto conversion and gRPC clients. Everything else is
# domain code (kernel, stores, VMM side, agent and control-plane logic) and must not know gRPC.
GRPC_EDGE = {
    "tiermem/agent/server.py", "tiermem/agent/service.py",
    "tiermem/control/server.py", "tiermem/control/service.py", "tiermem/control/convert.py",
    "tiermem/control/agents.py",  # the control plane's gRPC client of node agents
    "tiermem/bench/control.py",  # serves lightweight NodeAgent stubs for the scale benchmark
}  # fmt: skip


def test_domain_code_knows_nothing_of_grpc() -> None:
    """Only tiermem/rpc, the generated package and the edge modules import grpc or protobuf code."""
    offenders = []
    for path in (ROOT / "tiermem").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("tiermem/rpc/", "tiermem/v1/")) or rel in GRPC_EDGE:
            continue
        text = path.read_text()
        if "tiermem.v1" in text or "_pb2" in text or "\nimport grpc" in text or "\nfrom grpc" in text:
            offenders.append(rel)
    assert not offenders, f"gRPC or generated protobuf code imported by domain modules: {offenders}"
    for rel in GRPC_EDGE:
        assert (ROOT / rel).exists(), f"stale allow-list entry {rel}"
