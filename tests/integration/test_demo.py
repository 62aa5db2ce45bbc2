"""``tiermem demo``: the main job, run as a newcomer runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.timing import scaled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PNG = b"\x89PNG\r\n\x1a\n"


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiermem", "demo", "--json", "--plot", str(tmp_path / "demo.png"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=scaled(200),
    )


def _check_plot(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200


def test_demo_on_the_sim_saves_memory_and_keeps_every_byte(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--duration", "20s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)
    assert s["integrity_ok"] is True
    assert s["mismatches"] == 0 and s["pages_verified"] == s["total_pages"]
    assert s["saved_fraction"] > 0.3
    assert s["faults_served"] > 0  # the moving hot set and Zipf tail come back from the store
    assert {v["workload"].split(":")[0] for v in s["vms"]} == {"hotset", "zipf", "phases", "idle"}
    idle = next(v for v in s["vms"] if v["workload"] == "idle")
    assert idle["evicted_pages"] == idle["total_pages"]
    assert s["evicted_pages"] == sum(v["evicted_pages"] for v in s["vms"])
    assert Path(s["plot"]) == tmp_path / "demo.png"
    _check_plot(tmp_path / "demo.png")
    assert not list(tmp_path.glob("tiermem-demo-*")), "the temporary state directory was left behind"


@pytest.mark.uffd
def test_demo_with_real_process_guests(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--duration", "12s", "--backend", "uffd", "--memory", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)
    assert s["backend"] == "uffd"
    assert s["integrity_ok"] is True
    assert s["saved_fraction"] > 0.3
    _check_plot(tmp_path / "demo.png")


@pytest.mark.rwp
def test_demo_on_the_kernels_rwp(tmp_path: Path) -> None:
    """The issue's check on a 7.3 host: pure JSON on stdout, every byte intact.

    16 MiB per VM instead of the default 64: the kernel-VM tier runs under TCG, where populating and
    verifying 4 x 64 MiB through faults takes minutes (the default size was run by hand, docs/benchmarks.md).
    """
    proc = _demo(tmp_path, "--backend", "rwp", "--duration", "20s", "--memory", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)  # nothing but the JSON on stdout
    assert s["backend"] == "rwp"
    assert s["integrity_ok"] is True and s["mismatches"] == 0
    assert s["pages_verified"] == s["total_pages"]
    assert s["evicted_pages"] > 0 and s["cycles"] > 0


def test_demo_rwp_is_refused_in_one_line_where_the_kernel_lacks_it(tmp_path: Path) -> None:
    from tiermem.kernel.probe import probe_host

    if probe_host().backends["rwp"]:
        pytest.skip("this kernel has userfaultfd RWP: the refusal cannot happen here")
    proc = subprocess.run(
        [sys.executable, "-m", "tiermem", "demo", "--backend", "rwp", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--backend rwp is not available here" in lines[0] and "RWP" in lines[0]


def test_json_output_is_pure_while_the_demo_logs_warnings(tmp_path: Path) -> None:
    """Warnings logged during the run (structlog and stdlib) go to stderr; stdout is only the JSON."""
    code = (
        "import logging, structlog\n"
        "import tiermem.cli.demo as d\n"
        "from tiermem.demo.runner import DemoSummary\n"
        "async def fake(cfg, on_sample=None):\n"
        "    structlog.get_logger('tiermem.agent').warning('structlog-warning-line', vm='x')\n"
        "    logging.getLogger('grpc').warning('stdlib-warning-line')\n"
        "    return DemoSummary(integrity_ok=True, backend=cfg.backend)\n"
        "d.run_demo = fake\n"
        "from tiermem.cli.main import main\n"
        "main(['demo', '--json', '--duration', '1s'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=scaled(60)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["integrity_ok"] is True
    assert "structlog-warning-line" in proc.stderr and "stdlib-warning-line" in proc.stderr


def test_ctrl_c_stops_the_demo_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiermem", "demo", "--duration", "120s", "--workdir", str(tmp_path / "w")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "w" / "agent" / "index.db").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the demo did not start"
        time.sleep(0.1)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted" in out + err


def test_bad_flag_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tiermem", "demo", "--duration", "soon"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "--duration" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
