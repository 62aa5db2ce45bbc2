"""The issue's "done when", as a user runs it: ``tiermem serve agent`` running, ``tiermem snapshot
import ... --json``, then a client restoring exactly like Firecracker on the printed socket.

Both tiermem commands are separate processes; the stores are real servers (redis-server,
SeaweedFS over HTTP). The memory must come back byte-identical from every store, and
without an import the handshake is refused and no page is ever served.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.servers import RedisServer, S3Server, free_port, wait_port
from tiermem.guests.firecracker import FirecrackerProcess

pytestmark = [pytest.mark.uffd, pytest.mark.redis, pytest.mark.s3, pytest.mark.timeout(400)]

MiB = 1 << 20


def tiermem(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiermem", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def agent_proc(tmp_path: Path, redis_srv: RedisServer, s3_srv: S3Server) -> Iterator[tuple[str, Path]]:
    port = free_port()
    handoff = tmp_path / "h" / "handoff.sock"
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tiermem",
            "serve",
            "agent",
            "--listen",
            f"127.0.0.1:{port}",
            "--node-id",
            "fc1",
            "--data-dir",
            str(tmp_path / "agent"),
            "--handoff-socket",
            str(handoff),
            "--restore-socket-dir",
            str(tmp_path / "r"),
            "--store",
            f"redis={redis_srv.url}",
            "--store",
            f"s3={s3_srv.url('fc-cli')}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, **s3_srv.env()},
    )
    try:
        wait_port(port, 60, proc)
        yield f"127.0.0.1:{port}", handoff
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.mark.parametrize("store", ["default", "redis", "s3"])
def test_import_then_restore_gives_byte_identical_memory(
    agent_proc: tuple[str, Path], tmp_path: Path, store: str
) -> None:
    address, _ = agent_proc
    raw = np.random.default_rng(19).integers(0, 256, 64 * MiB, dtype=np.uint8)
    raw.reshape(-1, 4096)[::9] = 0  # some zero pages
    mem = tmp_path / "mem.bin"
    mem.write_bytes(raw.tobytes())
    vm = f"fc-{store}"
    more = ["--prefetch", "64"] if store == "s3" else []  # one ranged GET per fault: fetch more per trip
    r = tiermem(
        "snapshot",
        "import",
        vm,
        "--mem-file",
        str(mem),
        "--store",
        store,
        "--agent",
        address,
        "--json",
        *more,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"vm_id", "pages", "zero_pages", "stored_bytes", "socket"} <= set(out)
    assert out["vm_id"] == vm and out["pages"] == 16384 and out["zero_pages"] == len(range(0, 16384, 9))
    assert os.path.exists(out["socket"])
    fc = FirecrackerProcess(out["socket"], "40M,24M", hole="4M", vcpus=2)
    try:
        dump = tmp_path / "dump.bin"
        fc.cmd(f"dump {dump}", timeout=300)
        assert dump.read_bytes() == raw.tobytes()
    finally:
        fc.close()
    again = tiermem("snapshot", "import", vm, "--mem-file", str(mem), "--store", store, "--agent", address)
    assert again.returncode == 1 and "already" in again.stderr and "Traceback" not in again.stderr


def test_without_an_import_the_handshake_is_refused_and_nothing_is_served(
    agent_proc: tuple[str, Path],
) -> None:
    _, handoff = agent_proc
    fc = FirecrackerProcess(str(handoff), "8M", vcpus=2)
    try:
        fc.cmd("start 0-2047")
        time.sleep(1.5)
        assert fc.cmd("progress")["done"] == 0  # every touch still waits: no zero page was served
    finally:
        fc.kill()
        fc.close()


def test_bad_import_requests_are_one_line_errors(agent_proc: tuple[str, Path], tmp_path: Path) -> None:
    address, _ = agent_proc
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"x" * 5000)
    cases = [
        (["--mem-file", str(tmp_path / "missing.bin")], "cannot read"),
        (["--mem-file", str(odd)], "multiple of 4096"),
        (["--mem-file", str(odd), "--store", "nope"], "unknown store"),
        (["--mem-file", str(odd), "--mem-object", "s3://b/k"], "exactly one"),
    ]
    for args, msg in cases:
        r = tiermem("snapshot", "import", "vm-bad", *args, "--agent", address)
        assert r.returncode in (1, 3), (args, r.returncode, r.stderr)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_import_shows_progress_on_a_tty(agent_proc: tuple[str, Path], tmp_path: Path) -> None:
    import pty

    address, _ = agent_proc
    mem = tmp_path / "tty.bin"
    mem.write_bytes(np.random.default_rng(5).integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes())
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tiermem",
            "snapshot",
            "import",
            "fc-tty",
            "--mem-file",
            str(mem),
            "--agent",
            address,
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(60) == 0
    text = out.decode(errors="replace")
    assert "importing" in text and "4096/4096" in text  # the progress bar, drawn on the terminal
    assert "restore socket:" in text and "backend_path" in text
