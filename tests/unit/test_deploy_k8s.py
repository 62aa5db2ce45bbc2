"""deploy/k8s: every manifest against the Kubernetes JSON schemas (kubernetes-validate, offline), plus structure.

The structure checks are what a schema cannot see: selectors match pod labels,
Services target named container ports, every mount has a volume, every
ConfigMap/Secret reference (and key) exists, settings keys are fields of the
tiermem settings models, the seccomp ConfigMap is the shipped profile, and the
credentials the components present to each other agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.unit.test_deploy_compose import _model_has
from tiermem.config import AgentSettings, ControlPlaneSettings, load_settings
from tiermem.rpc.security import ALL_TENANTS, parse_tokens

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VERSIONS = [
    "1.29.0",
    "1.37.0",
]  # the oldest we claim (native sidecar-free, grpc probes GA) and the newest bundled


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out.append((f.name, doc))
    return out


DOCS = _docs()


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCS if d["kind"] == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workloads() -> list[dict[str, Any]]:
    return _kind("Deployment") + _kind("DaemonSet")


def _containers(w: dict[str, Any]) -> list[dict[str, Any]]:
    spec = w["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("fname", "doc"), DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS]
)
def test_manifest_matches_the_kubernetes_schema(version: str, fname: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError with the path


def test_kustomization_lists_every_manifest() -> None:
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == files
    images = {i["name"] for i in k["images"]}
    used = {c["image"].split(":")[0] for w in _workloads() for c in _containers(w)}
    assert used <= images


def test_everything_is_in_the_tiermem_namespace() -> None:
    for _, d in DOCS:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "tiermem", d["metadata"]["name"]


# ---------------------------------------------------------------- structure


def test_selectors_match_pod_labels_and_services_target_named_ports() -> None:
    for w in _workloads():
        sel = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert sel.items() <= labels.items(), w["metadata"]["name"]
    for svc in _kind("Service"):
        pods = [
            w
            for w in _workloads()
            if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"service {svc['metadata']['name']} selects {len(pods)} workloads"
        ports = {
            p["name"]: p["containerPort"]
            for c in pods[0]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"{svc['metadata']['name']}: no container port {p['targetPort']}"
    for pdb in _kind("PodDisruptionBudget"):
        assert any(
            pdb["spec"]["selector"]["matchLabels"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
            for w in _workloads()
        )


def test_volumes_and_mounts_agree() -> None:
    for w in _workloads():
        spec = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounted = set()
        for c in _containers(w):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{w['metadata']['name']}/{c['name']}: no volume {m['name']}"
                mounted.add(m["name"])
        assert mounted == set(volumes), f"{w['metadata']['name']}: unused volumes {set(volumes) - mounted}"


def _data(kind: str, name: str) -> dict[str, str]:
    d = _one(kind, name)
    return dict(d.get("stringData") or {}) | dict(d.get("data") or {})


def test_configmap_and_secret_references_exist() -> None:
    for w in _workloads():
        spec = w["spec"]["template"]["spec"]
        for v in spec["volumes"]:
            if "secret" in v:
                keys = _data("Secret", v["secret"]["secretName"])
                for item in v["secret"].get("items", []):
                    assert item["key"] in keys, f"secret {v['secret']['secretName']} has no key {item['key']}"
            if "configMap" in v:
                _one("ConfigMap", v["configMap"]["name"])
        for c in _containers(w):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    _one("ConfigMap", src["configMapRef"]["name"])
                if "secretRef" in src:
                    _one("Secret", src["secretRef"]["name"])
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in _data("Secret", ref["name"]), (
                        f"{ref['name']} has no key {ref['key']}"
                    )


def test_every_container_has_resources_probes_and_a_pinned_image() -> None:
    for w in _workloads():
        for c in _containers(w):
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]
        for c in w["spec"]["template"]["spec"]["containers"]:
            kind = "agent" if w["kind"] == "DaemonSet" else "controlplane"
            assert c["args"] == ["serve", kind]
            for probe in ("readinessProbe", "livenessProbe"):
                cmd = c[probe]["exec"]["command"]
                assert cmd[:5] == ["python", "-m", "tiermem.rpc.health_probe", "--settings", kind], cmd


def _env_of(w: dict[str, Any]) -> dict[str, str]:
    """The container environment as the kubelet builds it (ConfigMaps, Secrets, literal values)."""
    c = w["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(_data("ConfigMap", src["configMapRef"]["name"]))
        if "secretRef" in src:
            env.update(_data("Secret", src["secretRef"]["name"]))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"].replace("$(POD_IP)", "10.0.0.7")
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = _data("Secret", ref["name"])[ref["key"]]
        else:
            env[e["name"]] = {"metadata.name": "cp-0", "spec.nodeName": "node-a", "status.podIP": "10.0.0.7"}[
                e["valueFrom"]["fieldRef"]["fieldPath"]
            ]
    return env


@pytest.mark.parametrize(
    ("kind", "model"), [("Deployment", ControlPlaneSettings), ("DaemonSet", AgentSettings)]
)
def test_environment_keys_are_settings_fields_and_load(
    kind: str, model: type[ControlPlaneSettings] | type[AgentSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    (w,) = _kind(kind)
    env = _env_of(w)
    prefix = "TIERMEM_CP_" if model is ControlPlaneSettings else "TIERMEM_AGENT_"
    keys = [k for k in env if k.startswith("TIERMEM_")]
    assert len(keys) > 10
    for k in keys:
        assert k.startswith(prefix) and _model_has(model, k.removeprefix(prefix).split("__")), k
    for k in [k for k in os.environ if k.startswith("TIERMEM_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings(model)
    assert s.tls.require_client_cert and s.tls.cert_file.startswith("/etc/tiermem/tls/")
    mounts = {m["mountPath"] for m in w["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert os.path.dirname(s.tls.cert_file) in mounts and os.path.dirname(s.token.removeprefix("@")) in mounts
    if model is ControlPlaneSettings:
        assert s.state.startswith(("redis://", "rediss://"))
        assert s.replica_id == "cp-0"
    else:
        assert s.advertise == "10.0.0.7:7070" and s.node_id == "node-a"
        assert set(s.store_urls()) >= {"default", "s3", "redis"}


def test_control_plane_runs_two_replicas_non_root() -> None:
    cp = _one("Deployment", "tiermem-controlplane")
    assert cp["spec"]["replicas"] == 2
    pod = cp["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    c = pod["containers"][0]["securityContext"]
    assert c["capabilities"]["drop"] == ["ALL"] and c["readOnlyRootFilesystem"] is True


def test_agent_daemonset_privileges_and_seccomp_profile() -> None:
    ds = _one("DaemonSet", "tiermem-agent")
    pod = ds["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    sc = agent["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
    assert sc["seccompProfile"] == {"type": "Localhost", "localhostProfile": "tiermem/agent.json"}
    # the init container installs exactly that profile under the kubelet's seccomp root
    (init,) = pod["initContainers"]
    assert "/host-seccomp/tiermem/agent.json" in init["command"][-1]
    host = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in init["volumeMounts"] if m["mountPath"] == "/host-seccomp"]
    assert host[mount["name"]]["hostPath"]["path"] == "/var/lib/kubelet/seccomp"
    cm = _data("ConfigMap", "tiermem-agent-seccomp")
    shipped = json.loads((ROOT / "services/agent/seccomp.json").read_text())
    assert json.loads(cm["agent.json"]) == shipped, "regenerate deploy/k8s/seccomp-configmap.yaml"
    # the handoff socket lives on the host, where the VMM is
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    assert host[mounts["/run/tiermem"]]["hostPath"]["path"] == "/run/tiermem"
    assert host[mounts["/var/lib/tiermem/agent"]]["hostPath"]["path"] == "/var/lib/tiermem/agent"


def test_tokens_agree_between_components() -> None:
    tokens = _data("Secret", "tiermem-tokens")
    cp_tokens = parse_tokens(tokens["cp-tokens"])
    # agents hold the node role, never a fleet admin token
    assert cp_tokens.get(tokens["node-token"]) == "node:*"
    assert parse_tokens(tokens["agent-tokens"]).get(tokens["agent-token"]) == ALL_TENANTS
