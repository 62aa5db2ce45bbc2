"""Each setting is declared once, in the settings models; every ``tiermem serve`` flag lands on one of them.

The flags of ``serve controlplane`` / ``serve agent`` are checked against
``ControlPlaneSettings`` / ``AgentSettings`` (tiermem/config.py): every flag
sets a field that exists, and every field has a flag or is listed here as
settable only from the environment or the TOML file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import pytest
from pydantic import BaseModel

from tiermem.cli.serve import agent_overrides, controlplane_overrides, serve
from tiermem.config import AgentSettings, ControlPlaneSettings, TlsSettings

# Fields without a flag, on purpose: tuning and behaviour switches that belong in a deployment's file or env.
FILE_ONLY = {
    "controlplane": {
        "leader_lease_ms",
        "metrics_tls",
        "reflection_without_token",
        "tenant_manual_cycles",
        "tenant_manual_cycles_per_node",
        "tenant_manual_max_interval_ms",
    },
    "agent": {
        "autonomous",
        "max_concurrent_cycles",
        "native_faults",
        "handshake_timeout_s",
        "tenant_manual_cycles",
        "tenant_manual_max_interval_ms",
        "capacity_bytes",
        "trace_dir",
        "trace_max_bytes",
        "page_key_file",
        "metrics_tls",
        "reflection_without_token",
    },
}
CASES: list[tuple[str, type[BaseModel], Callable[..., dict[str, Any]]]] = [
    ("controlplane", ControlPlaneSettings, controlplane_overrides),
    ("agent", AgentSettings, agent_overrides),
]


def _sample(param: click.Parameter) -> object:
    """A valid, already-converted value for ``param`` (what click would hand the command)."""
    if param.multiple:
        return ("name=1",)
    if isinstance(param, click.Option) and (param.is_flag or param.is_bool_flag):
        return True
    if isinstance(param.type, click.Choice):
        return param.type.choices[0]
    if isinstance(param.type, click.types.FloatParamType):
        return 1.0
    if isinstance(param.type, click.types.StringParamType):
        return "x"
    return 1000  # ints and durations (milliseconds)


def _flags(kind: str) -> list[click.Parameter]:
    cmd = serve.commands[kind]
    return [p for p in cmd.params if p.name != "config_file"]


@pytest.mark.parametrize(("kind", "model", "overrides"), CASES, ids=[c[0] for c in CASES])
def test_every_flag_sets_an_existing_field(
    kind: str, model: type[BaseModel], overrides: Callable[..., dict[str, Any]]
) -> None:
    for param in _flags(kind):
        out = overrides(**{str(param.name): _sample(param)})
        assert out, f"--{param.name} of `serve {kind}` sets no setting"
        assert set(out) <= set(model.model_fields), (
            f"--{param.name} sets unknown fields {set(out) - set(model.model_fields)}"
        )
        for key, value in out.items():
            if isinstance(value, dict) and model.model_fields[key].annotation is TlsSettings:
                assert set(value) <= set(TlsSettings.model_fields), (param.name, value)
        model.model_validate({**out})  # the value has the field's type


@pytest.mark.parametrize(("kind", "model", "overrides"), CASES, ids=[c[0] for c in CASES])
def test_every_field_has_a_flag_or_is_file_only(
    kind: str, model: type[BaseModel], overrides: Callable[..., dict[str, Any]]
) -> None:
    covered: set[str] = set()
    for param in _flags(kind):
        covered |= set(overrides(**{str(param.name): _sample(param)}))
    missing = set(model.model_fields) - covered - FILE_ONLY[kind]
    assert missing == set(), f"settings of `serve {kind}` without a flag (add one, or list them in FILE_ONLY)"
    assert FILE_ONLY[kind] <= set(model.model_fields) - covered, "FILE_ONLY lists a field that has a flag"


def test_unset_flags_set_nothing() -> None:
    for kind, _model, overrides in CASES:
        assert overrides(**{str(p.name): None for p in _flags(kind)}) == {}, kind
