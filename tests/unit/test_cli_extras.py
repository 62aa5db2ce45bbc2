"""Optional dependencies: a command that needs an extra that is not installed fails in one line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tiermem.cli.errors import EXIT_PRECONDITION, CliExit, require_extra

# Runs the CLI in a fresh interpreter where matplotlib cannot be imported (as after `pip install tiermem`).
_WITHOUT_MATPLOTLIB = (
    "import sys\n"
    "sys.modules['matplotlib'] = None  # import matplotlib now raises ImportError\n"
    "from tiermem.cli.main import main\n"
    "sys.argv = ['tiermem', *sys.argv[1:]]\n"
    "main()\n"
)


def _cli_without_matplotlib(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_MATPLOTLIB, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def test_require_extra_names_the_extra() -> None:
    with pytest.raises(CliExit) as e:
        require_extra("tiermem_no_such_module", "demo", "tiermem demo")
    assert e.value.exit_code == EXIT_PRECONDITION
    assert e.value.format_message() == (
        "tiermem demo needs tiermem_no_such_module, an optional dependency: pip install 'tiermem[demo]'"
    )
    require_extra("numpy", "demo", "anything")  # installed: no error


def test_demo_without_matplotlib_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    r = _cli_without_matplotlib("demo", "--duration", "1s", cwd=tmp_path)
    assert r.returncode == EXIT_PRECONDITION, r.stderr
    assert r.stderr.strip().splitlines() == [
        "tiermem: error: tiermem demo needs matplotlib, an optional dependency: pip install 'tiermem[demo]'"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_simulate_sweep_without_matplotlib_names_the_extra_and_plain_simulate_works(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("tick,page,op\n0,1,r\n1,2,w\n2,1,r\n")
    r = _cli_without_matplotlib("simulate", "--trace", str(trace), "--sweep", "cold-after=1,2", cwd=tmp_path)
    assert r.returncode == EXIT_PRECONDITION, r.stderr
    assert "pip install 'tiermem[demo]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    ok = _cli_without_matplotlib("simulate", "--trace", str(trace), "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert '"promotions"' in ok.stdout
