#!/usr/bin/env python3
"""Regenerate the committed protobuf/gRPC code in ``tiermem/v1`` from ``proto/``.

Usage: ``python scripts/gen_protos.py [OUTPUT_ROOT]``. With no argument the code is
written into the repository; the freshness test passes a temporary directory and
compares the bytes.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = Path("tiermem") / "v1"
INIT = '"""Generated protobuf and gRPC code for the tiermem.v1 contracts. Do not edit."""\n'


def generate(out_root: Path) -> list[Path]:
    """Generate into ``out_root/tiermem/v1`` and return the files written."""
    out_dir = out_root / PACKAGE
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_dir / "__init__.py").write_text(INIT)
    return sorted(p for p in out_dir.iterdir() if p.is_file())


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(target):
        print(path.relative_to(target))
