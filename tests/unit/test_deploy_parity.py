"""One deployment, three descriptions: compose, Kubernetes and the images' config files agree.

* every setting that more than one of them sets has one value, equal to the built-in default
  unless the deployment has a reason to differ (listen addresses, paths, peers);
* the containers run under the same user, capabilities, seccomp profile, read-only root and PID
  namespace in compose as in the manifests, so the deployment tier (tests/deploy), which runs the
  compose stack on a real engine, also proves the manifests' security context;
* ``kubectl kustomize deploy/k8s``, done here by the test itself (namespace and image transforms
  over the listed resources): the rendered objects set KNOWN_STORES and a plain-HTTP metrics port
  that the scrape annotations name.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from tiermem.config import AgentSettings, ControlPlaneSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# Settings set by several descriptions, which must agree (and equal the built-in default).
SHARED: dict[str, tuple[type[BaseModel], list[str]]] = {
    "CP": (
        ControlPlaneSettings,
        [
            "LEASE_TTL_MS",
            "LEADER_LEASE_MS",
            "MAX_CONCURRENT_CYCLES_PER_NODE",
            "SCHEDULER",
            "REFLECTION",
            "LOG_JSON",
            "LOG_LEVEL",
            "JITTER",
        ],
    ),
    "AGENT": (
        AgentSettings,
        ["HEARTBEAT_MS", "AUTONOMOUS_AFTER_MS", "FSYNC", "REFLECTION", "LOG_JSON", "LOG_LEVEL"],
    ),
}
TOML = {"CP": ROOT / "services/controlplane/config.toml", "AGENT": ROOT / "services/agent/config.toml"}
CONFIGMAP = {"CP": "tiermem-controlplane", "AGENT": "tiermem-agent"}


def _env_file() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / ".env").read_text().splitlines():
        if line.strip() and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, _, default = m.group(1).partition(":-")
        return env.get(name.split(":?")[0], default)

    return re.sub(r"\$\{([^}]+)\}", sub, value)


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "docker-compose.yml").read_text()))


def _compose_env(service: str) -> dict[str, str]:
    env = _env_file()
    raw = _compose()["services"][service].get("environment", {})
    return {k: _interpolate(str(v), env) for k, v in raw.items()}


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def _configmap(name: str) -> dict[str, str]:
    return next(d["data"] for d in _k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)


def _norm(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).lower()


def _default(model: type[BaseModel], key: str) -> Any:
    return model.model_fields[key.lower()].default


@pytest.mark.parametrize("svc", ["CP", "AGENT"])
def test_one_default_per_setting(svc: str) -> None:
    model, keys = SHARED[svc]
    toml = tomllib.loads(TOML[svc].read_text())
    cm = _configmap(CONFIGMAP[svc])
    compose = _compose_env("controlplane") if svc == "CP" else _compose_env("agent-1")
    for key in keys:
        var = f"TIERMEM_{svc}_{key}"
        values = {"built-in": _norm(_default(model, key))}
        if key.lower() in toml:
            values["services/*/config.toml"] = _norm(toml[key.lower()])
        if var in cm:
            values["k8s ConfigMap"] = _norm(cm[var])
        if var in compose:
            values["compose"] = _norm(compose[var])
        assert len(values) >= 2, f"{var}: set by no deployment description"
        assert len(set(values.values())) == 1, f"{var}: different defaults {values}"


def test_known_stores_agree_with_the_agents_stores() -> None:
    compose_stores = {
        k.split("__", 1)[1].lower() for k in _compose_env("agent-1") if k.startswith("TIERMEM_AGENT_STORES__")
    }
    assert json.loads(_compose_env("controlplane")["TIERMEM_CP_KNOWN_STORES"]) == sorted(
        {"default"} | compose_stores
    )
    k8s_stores = set()
    for d in _k8s_docs():
        if d["kind"] in ("ConfigMap",):
            k8s_stores |= {
                k.split("__", 1)[1].lower()
                for k in d.get("data", {})
                if k.startswith("TIERMEM_AGENT_STORES__")
            }
        if d["kind"] == "DaemonSet":
            for c in d["spec"]["template"]["spec"]["containers"]:
                k8s_stores |= {
                    e["name"].split("__", 1)[1].lower()
                    for e in c.get("env", [])
                    if e["name"].startswith("TIERMEM_AGENT_STORES__")
                }
    known = json.loads(_configmap("tiermem-controlplane")["TIERMEM_CP_KNOWN_STORES"])
    assert sorted(known) == sorted({"default"} | k8s_stores)


def _k8s_container(kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    for d in _k8s_docs():
        if d["kind"] == kind:
            pod = d["spec"]["template"]["spec"]
            return pod, next(c for c in pod["containers"] if c["name"] == name)
    raise AssertionError(f"no {kind}")


def test_security_context_parity() -> None:
    svcs = _compose()["services"]
    # the real-userfaultfd agent and the DaemonSet
    pod, c = _k8s_container("DaemonSet", "agent")
    sc, uffd = c["securityContext"], svcs["agent-uffd"]
    assert str(uffd["user"]).split(":")[0] == str(sc["runAsUser"]) == "0"
    assert uffd["cap_drop"] == sc["capabilities"]["drop"] == ["ALL"]
    assert uffd["cap_add"] == sc["capabilities"]["add"] == ["SYS_PTRACE"]
    assert uffd["read_only"] is True and sc["readOnlyRootFilesystem"] is True
    assert "no-new-privileges:true" in uffd["security_opt"] and sc["allowPrivilegeEscalation"] is False
    assert uffd["pid"] == "host" and pod["hostPID"] is True
    seccomp = next(o.split("=", 1)[1] for o in uffd["security_opt"] if o.startswith("seccomp="))
    assert (DEPLOY / seccomp).resolve() == (ROOT / "services/agent/seccomp.json").resolve()
    profile = next(d for d in _k8s_docs() if d["metadata"]["name"] == "tiermem-agent-seccomp")["data"][
        "agent.json"
    ]
    assert json.loads(profile) == json.loads((ROOT / "services/agent/seccomp.json").read_text())
    assert sc["seccompProfile"] == {"type": "Localhost", "localhostProfile": "tiermem/agent.json"}
    # the control plane
    pod, c = _k8s_container("Deployment", "controlplane")
    cp = svcs["controlplane"]
    assert str(cp["user"]) == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert cp["cap_drop"] == c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert cp["read_only"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert (
        "no-new-privileges:true" in cp["security_opt"]
        and c["securityContext"]["allowPrivilegeEscalation"] is False
    )


def _kustomize() -> list[dict[str, Any]]:
    """What ``kubectl kustomize deploy/k8s`` does with this kustomization: namespace and image transforms."""
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(k) <= {"apiVersion", "kind", "namespace", "resources", "images"}, (
        "a transform this test does not render"
    )
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in k.get("images", [])}
    out = []
    for res in k["resources"]:
        for d in yaml.safe_load_all((K8S / res).read_text()):
            if not d:
                continue
            if d["kind"] != "Namespace":
                d["metadata"]["namespace"] = k["namespace"]
            pod = d.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                name = c["image"].split(":")[0]
                if name in images:
                    c["image"] = images[name]
            out.append(d)
    return out


def test_kustomize_render() -> None:
    docs = _kustomize()
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    for want in (
        "ConfigMap/tiermem-agent",
        "ConfigMap/tiermem-controlplane",
        "DaemonSet/tiermem-agent",
        "Deployment/tiermem-controlplane",
        "Service/tiermem-agent",
        "Service/tiermem-controlplane",
    ):
        assert want in kinds
    assert all(d["metadata"].get("namespace") == "tiermem" for d in docs if d["kind"] != "Namespace")
    for d in docs:
        if d["kind"] not in ("Deployment", "DaemonSet"):
            continue
        pod = d["spec"]["template"]["spec"]
        env = {}
        for ref in pod["containers"][0].get("envFrom", []):
            if "configMapRef" in ref:
                env.update(
                    next(
                        x["data"]
                        for x in docs
                        if x["kind"] == "ConfigMap" and x["metadata"]["name"] == ref["configMapRef"]["name"]
                    )
                )
        prefix = "TIERMEM_CP_" if d["kind"] == "Deployment" else "TIERMEM_AGENT_"
        # metrics: plain HTTP (no metrics TLS) on the port the scrape annotations and the Service name
        assert not [k for k in env if k.startswith(prefix + "METRICS_TLS__")]
        port = int(env[prefix + "METRICS_LISTEN"].rsplit(":", 1)[1])
        ann = d["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == port
        named = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
        assert named["metrics"] == port
        if d["kind"] == "Deployment":
            assert json.loads(env["TIERMEM_CP_KNOWN_STORES"])
        else:
            assert pod["hostPID"] is True


def test_loopback_override_changes_only_where_services_listen() -> None:
    """The override must not fork a service's command or security settings (the redis ACL drifted once)."""

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!reset", lambda loader, node: None)  # compose's "drop the inherited value"
    override = yaml.load((DEPLOY / "docker-compose.loopback.yml").read_text(), Loader=_Loader)
    allowed = {"network_mode", "extra_hosts", "ports", "hostname", "environment", "command", "healthcheck"}
    for name, svc in override["services"].items():
        assert set(svc) - {"<<"} <= allowed, f"{name}: {set(svc) - allowed}"
        assert svc.get("network_mode", "host") == "host"
        if name != "s3":  # weed's ports are flags; every other service reads its address from the environment
            assert "command" not in svc and "healthcheck" not in svc, name
    # the redis command (with its ACL) is the main file's
    assert "+info" in " ".join(_compose()["services"]["redis"]["command"])
