"""deploy/docker-compose.yml without a Docker engine: the compose-spec schema and what it cannot express.

The helpers here (``load_compose``, ``interpolate``) are also used by the
integration test that starts each tiermem service's command as a local process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from tiermem.config import AgentSettings, ClientSettings, ControlPlaneSettings
from tiermem.rpc.security import ALL_TENANTS, parse_tokens

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_FILE = DEPLOY / ".env"
TIERMEM_SERVICES = {
    "controlplane": "controlplane",
    "agent-1": "agent",
    "agent-2": "agent",
    "agent-uffd": "agent",
}

# ---------------------------------------------------------------- compose semantics the tests need


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env file (comments and blank lines skipped)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"malformed .env line: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-spec interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}, ${VAR:+a}, ${VAR+a}."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        expr = m.group("braced") if m.group("braced") is not None else m.group("plain")
        op = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", expr, re.S)
        if op is None:
            raise ValueError(f"invalid interpolation ${{{expr}}}")
        name, kind, arg = op.group(1), op.group(2), op.group(3) or ""
        val = env.get(name)
        empty = val is None or (kind is not None and kind.startswith(":") and val == "")
        if kind in (":-", "-"):
            return arg if empty else str(val)
        if kind in (":?", "?"):
            if empty:
                raise ValueError(f"required variable {name} is missing: {arg}")
            return str(val)
        if kind in (":+", "+"):
            return "" if empty else arg
        return "" if val is None else val

    return _VAR.sub(sub, text)


def _interp(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interp(x, env) for x in node]
    if isinstance(node, dict):
        return {k: _interp(v, env) for k, v in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file with anchors merged and variables interpolated from .env (or ``env``)."""
    raw = yaml.safe_load(COMPOSE.read_text())
    return dict(_interp(raw, read_env_file() if env is None else env))


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (list or mapping form)."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# ---------------------------------------------------------------- schema


def test_compose_file_matches_the_compose_spec_schema() -> None:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which(
        "check-jsonschema"
    )
    assert exe, "check-jsonschema is part of the test extra"
    out = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_variable_has_a_value_or_a_default() -> None:
    load_compose()  # raises on a ${VAR:?} without a value in .env
    for m in _VAR.finditer(COMPOSE.read_text()):
        expr = m.group("braced")
        if expr is None or m.group(0) == "$$":
            continue
        name = re.match(r"[A-Za-z_][A-Za-z0-9_]*", expr)
        assert name, expr
        documented = name.group(0) in read_env_file()
        assert documented or ":-" in expr or "-" in expr[len(name.group(0)) :][:1], (
            f"${{{expr}}}: neither in .env nor with a default"
        )


# ---------------------------------------------------------------- structure


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def _one_shot(svc: dict[str, Any]) -> bool:
    return str(svc.get("restart", "no")) == "no"


def test_long_running_services_have_healthchecks_and_depends_on_waits_for_health(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name, svc in services.items():
        if not _one_shot(svc):
            hc = svc.get("healthcheck")
            assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: use the long depends_on form with conditions"
        for target, cond in deps.items():
            assert target in services, f"{name} depends on unknown service {target}"
            if services[target].get("healthcheck"):
                assert cond.get("condition") == "service_healthy", f"{name} -> {target} must wait for health"


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        assert image, f"{name} has no image name"
        last = image.rsplit("/", 1)[-1]
        assert ":" in last or "@sha256:" in image, f"{name}: image {image} has no tag"
        assert not image.endswith(":latest"), f"{name}: {image} uses latest"


def test_published_ports_are_unique_and_on_loopback(compose: dict[str, Any]) -> None:
    seen: dict[str, str] = {}
    for name, svc in compose["services"].items():
        for p in svc.get("ports", []):
            parts = str(p).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name}: publish {p} on 127.0.0.1 only"
            host = parts[1]
            assert host not in seen, f"host port {host} published by {seen.get(host)} and {name}"
            seen[host] = name
    assert seen, "the control plane API must be published"


def test_referenced_files_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            ctx = (DEPLOY / build["context"]).resolve()
            assert (ctx / build["dockerfile"]).is_file(), f"{name}: missing {build['dockerfile']}"
        for opt in svc.get("security_opt", []):
            if opt.startswith("seccomp="):
                assert (DEPLOY / opt.split("=", 1)[1]).is_file(), f"{name}: missing seccomp profile {opt}"
        for vol in svc.get("volumes", []):
            src = str(vol).split(":", 1)[0]
            # absolute sources are host directories the operator provides (the handoff socket's)
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: bind source {src} missing"


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src, dst = str(vol).split(":")[:2]
            if dst == "/run/tiermem":
                # the handoff socket directory is the host's, where host VMMs connect (not state)
                assert src.startswith("/"), f"{name}: the handoff directory must be a host path"
                continue
            assert not src.startswith((".", "/")), (
                f"{name}: state in a bind mount ({vol}); use a named volume"
            )
            assert src in declared, f"{name}: volume {src} is not declared"
            used.add(src)
    assert declared == used, f"declared but unused volumes: {declared - used}"


def _model_has(model: type[BaseModel], path: list[str]) -> bool:
    """True if ``path`` (lower-cased env key parts) names a field of ``model``, nesting via ``__``."""
    fields = {n.lower(): f for n, f in model.model_fields.items()}
    head = path[0].lower()
    if head not in fields:
        return False
    if len(path) == 1:
        return True
    ann = fields[head].annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return _model_has(ann, path[1:])
    origin = getattr(ann, "__origin__", None)
    return origin is dict and len(path) == 2  # dict fields take one free key (stores__s3)


def test_every_tiermem_env_key_is_a_settings_field(compose: dict[str, Any]) -> None:
    checked = 0
    for name, svc in compose["services"].items():
        for key in service_env(svc):
            if not key.startswith("TIERMEM_"):
                continue
            if key.startswith("TIERMEM_CP_"):
                model: type[BaseModel] = ControlPlaneSettings
                rest = key.removeprefix("TIERMEM_CP_")
            elif key.startswith("TIERMEM_AGENT_"):
                model, rest = AgentSettings, key.removeprefix("TIERMEM_AGENT_")
            else:
                model, rest = ClientSettings, key.removeprefix("TIERMEM_")
            assert _model_has(model, rest.split("__")), f"{name}: {key} is not a field of {model.__name__}"
            checked += 1
    assert checked > 20


def test_service_environments_build_valid_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiermem.config import load_settings

    for name, kind in TIERMEM_SERVICES.items():
        env = service_env(compose["services"][name])
        with monkeypatch.context() as m:
            for k in [k for k in __import__("os").environ if k.startswith("TIERMEM_")]:
                m.delenv(k)
            for k, v in env.items():
                m.setenv(k, v)
            s = load_settings(AgentSettings if kind == "agent" else ControlPlaneSettings)
        if kind == "agent":
            assert set(s.store_urls()) >= {"default", "s3", "redis"}
            assert s.control_plane == "controlplane:7000"
            assert s.token and s.control_plane_token
        else:
            assert s.state.startswith("redis://")
            assert s.token and s.agent_token


def test_credentials_agree_across_services(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    redis_env, s3_env, cp = (
        service_env(svcs["redis"]),
        service_env(svcs["s3"]),
        service_env(svcs["controlplane"]),
    )
    state = urlsplit(cp["TIERMEM_CP_STATE"])
    assert (state.username, state.password, state.hostname) == (
        redis_env["REDIS_USER"],
        redis_env["REDIS_PASSWORD"],
        "redis",
    )
    cp_tokens = parse_tokens(cp["TIERMEM_CP_TOKEN"])
    for name in ("agent-1", "agent-2", "agent-uffd"):
        a = service_env(svcs[name])
        # the node role, not a fleet admin token, on every agent host (issue 17 item 6)
        assert cp_tokens.get(a["TIERMEM_AGENT_CONTROL_PLANE_TOKEN"]) == "node:*", (
            f"{name} must hold a node-role token"
        )
        assert a["TIERMEM_AGENT_TOKEN"] == cp["TIERMEM_CP_AGENT_TOKEN"], (
            f"{name} would refuse the control plane"
        )
        assert a["AWS_ACCESS_KEY_ID"] == s3_env["AWS_ACCESS_KEY_ID"]
        assert a["AWS_SECRET_ACCESS_KEY"] == s3_env["AWS_SECRET_ACCESS_KEY"]
        r = urlsplit(a["TIERMEM_AGENT_STORES__REDIS"])
        assert (r.username, r.password) == (redis_env["REDIS_USER"], redis_env["REDIS_PASSWORD"])
        assert f"/{s3_env['S3_BUCKET']}/" in a["TIERMEM_AGENT_STORES__S3"].replace("s3://", "/")
    cli = service_env(svcs["cli"])
    assert cp_tokens.get(cli["TIERMEM_TOKEN"]) == ALL_TENANTS


def test_tiermem_services_run_serve_and_probe_themselves(compose: dict[str, Any]) -> None:
    for name, kind in TIERMEM_SERVICES.items():
        svc = compose["services"][name]
        assert svc["command"] == ["serve", kind], name
        assert svc["healthcheck"]["test"] == [
            "CMD",
            "python",
            "-m",
            "tiermem.rpc.health_probe",
            "--settings",
            kind,
        ]
        assert svc["build"]["dockerfile"] == f"services/{kind}/Dockerfile"


def test_agent_profiles_and_privileges(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    for name in ("agent-1", "agent-2"):
        s = svcs[name]
        assert s["profiles"] == ["sim"]
        assert not s.get("devices") and not s.get("cap_add") and s.get("cap_drop") == ["ALL"]
        assert s.get("user") == "10001:10001"  # the image's non-root user, as the manifests name it
    u = svcs["agent-uffd"]
    assert u["profiles"] == ["uffd"]
    assert any(d.startswith("/dev/userfaultfd") for d in u["devices"])
    assert u["cap_drop"] == ["ALL"] and u["cap_add"] == ["SYS_PTRACE"]
    seccomp = [o for o in u["security_opt"] if o.startswith("seccomp=")]
    assert (
        seccomp and (DEPLOY / seccomp[0].split("=", 1)[1]).resolve() == ROOT / "services/agent/seccomp.json"
    )
    assert read_env_file()["COMPOSE_PROFILES"].split(",")[0] == "sim"  # plain `docker compose up` = sim stack


# ---------------------------------------------------------------- Dockerfiles and default configs


@pytest.mark.parametrize("kind", ["controlplane", "agent"])
def test_dockerfile_shape(kind: str) -> None:
    text = (ROOT / "services" / kind / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage build"
    default = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert default and not default.group(1).endswith(":latest") and ":" in default.group(1)
    assert all(f == "${BASE_IMAGE}" for f in froms), "every stage on the BASE_IMAGE build argument"
    assert "# syntax=" not in text, "no BuildKit frontend image to pull"
    assert "-c constraints.txt" in text, "versions from the lock file"
    assert "pip install -c constraints.txt ." in text, "no extras (demo, test) in the image"
    assert "COPY --from=builder /opt/tiermem /opt/tiermem" in text
    assert re.search(r"^USER 10001:10001$", text, re.M), "non-root by default"
    assert f'"--settings", "{kind}"' in text and "tiermem.rpc.health_probe" in text
    assert f'CMD ["serve", "{kind}"]' in text
    for src in re.findall(r"^COPY\s+(?!--from)(\S+)", text, re.M):
        assert (ROOT / src).exists(), f"{kind}: COPY source {src} missing"


@pytest.mark.parametrize(("kind", "cls"), [("controlplane", ControlPlaneSettings), ("agent", AgentSettings)])
def test_default_config_toml_loads(
    kind: str, cls: type[ControlPlaneSettings] | type[AgentSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiermem.config import load_settings

    for k in [k for k in __import__("os").environ if k.startswith("TIERMEM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TIERMEM_CONFIG", str(ROOT / "services" / kind / "config.toml"))
    s = load_settings(cls)
    assert s.listen.startswith("0.0.0.0:")
    assert s.metrics_listen == "0.0.0.0:9100"
    assert s.log_json is True
