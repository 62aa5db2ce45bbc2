"""Optional dependencies: a command that needs an extra that is not installed fails in one line naming it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tiermem.cli.errors import EXIT_PRECONDITION, CliExit, require_extra
from tiermem.cli.main import cli


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib cannot be imported, as after a plain `pip install tiermem`."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401


def _tiermem(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def test_require_extra_names_the_extra() -> None:
    with pytest.raises(CliExit) as e:
        require_extra("tiermem_no_such_module", "demo", "tiermem demo")
    assert e.value.exit_code == EXIT_PRECONDITION
    assert e.value.format_message() == (
        "tiermem demo needs tiermem_no_such_module, an optional dependency: pip install 'tiermem[demo]'"
    )
    require_extra("numpy", "demo", "anything")  # installed: no error


@pytest.mark.usefixtures("no_matplotlib")
def test_demo_without_matplotlib_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    r = _tiermem("demo", "--duration", "1s", "--workdir", str(tmp_path / "w"))
    assert r.exit_code == EXIT_PRECONDITION, r.output
    assert r.stderr.strip().splitlines() == [
        "tiermem: error: tiermem demo needs matplotlib, an optional dependency: pip install 'tiermem[demo]'"
    ]
    assert not (tmp_path / "w").exists()  # nothing started, nothing written


@pytest.mark.usefixtures("no_matplotlib")
def test_simulate_sweep_without_matplotlib_names_the_extra_and_plain_simulate_works(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("tick,page,op\n0,1,r\n1,2,w\n2,1,r\n")
    r = _tiermem("simulate", "--trace", str(trace), "--sweep", "cold-after=1,2")
    assert r.exit_code == EXIT_PRECONDITION, r.output
    assert "pip install 'tiermem[demo]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    ok = _tiermem("simulate", "--trace", str(trace), "--json")
    assert ok.exit_code == 0, ok.output
    assert '"promotions"' in ok.stdout
