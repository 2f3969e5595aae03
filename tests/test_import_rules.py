"""The layout's import rules, checked by reading every module's imports (no module is imported here).

- ``common`` imports no app (``client``, ``server``) and no ``simulations``;
- ``client`` and ``server`` never import each other;
- inside ``common`` only :mod:`common.federated.flwr_records` touches Flower;
- a ``common`` subpackage imports only subpackages of a lower layer (never one above it, never a sibling);
- the runtime packages the sites and the server run (``client``, ``server``, ``common`` less ``analysis``) never
  import ``common.analysis`` or ``simulations``, so the staged app bundle can leave them out;
- no import cycle anywhere, function-level imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("common", "client", "server", "simulations", "tests")

# Layer of each subpackage of common: a package may import packages of a strictly lower layer only.
LAYERS = {
    "core": 0,
    "phantoms": 1, "privacy": 1,
    "data": 2, "models": 2,
    "diffusion": 3,
    "active_learning": 4,
    "federated": 5,  # the Flower seam: what crosses it (weights, release deltas) is defined below it
    "analysis": 6,
}
FLOWER_MODULE = "common.federated.flwr_records"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for top in TOP:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[_module_name(path)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[str]:
    """Every module name ``path`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(sub if sub in MODULES else base)
    return found


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _project(name: str) -> str | None:
    """The project module ``name`` resolves to (its longest known prefix), or None for third-party names."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _violations(rule) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, names in IMPORTS.items() for dst in names if rule(src, dst))


def _sub(module: str) -> str | None:
    """The ``common`` subpackage of ``module`` (None for ``common`` itself and non-common modules)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "common" and len(parts) > 1 and parts[1] in LAYERS else None


def test_the_walk_sees_the_whole_layout():
    for package in LAYERS:
        assert f"common.{package}" in MODULES, f"common/{package}/__init__.py is missing"
    assert len(MODULES) > 60
    # `from common.core.config import RunConfig` resolves to the module; `from common.data import tensors` to the submodule
    assert "common.core.config" in IMPORTS["client.app"]
    assert "common.data.tensors" in IMPORTS["tests.test_diffusion"]


def test_common_imports_no_app_and_no_simulations():
    assert _violations(lambda s, d: s.startswith("common") and d.split(".")[0] in ("client", "server", "simulations",
                                                                                   "tests")) == []


def test_client_and_server_never_import_each_other():
    assert _violations(lambda s, d: {s.split(".")[0], d.split(".")[0]} == {"client", "server"}) == []


def test_only_the_record_module_touches_flower_inside_common():
    assert _violations(lambda s, d: s.startswith("common") and s != FLOWER_MODULE
                       and d.split(".")[0] == "flwr") == []
    assert any(d.startswith("flwr") for d in IMPORTS[FLOWER_MODULE])


def test_no_common_package_imports_one_above_it_or_a_sibling():
    def bad(src: str, dst: str) -> bool:
        a, b = _sub(src), _sub(_project(dst) or "")
        return a is not None and b is not None and a != b and LAYERS[b] >= LAYERS[a]

    assert _violations(bad) == []


def test_the_runtime_packages_never_load_analysis_or_simulations():
    def runtime(module: str) -> bool:
        return module.split(".")[0] in ("client", "server") or (module.startswith("common")
                                                               and _sub(module) != "analysis")

    assert _violations(lambda s, d: runtime(s) and (d.startswith("common.analysis")
                                                   or d.split(".")[0] == "simulations")) == []


def test_no_import_cycle_anywhere():
    graph = {m: sorted({p for d in IMPORTS[m] if (p := _project(d)) and p != m}) for m in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    assert cycles == []


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_every_package_says_what_it_holds(package):
    doc = ast.get_docstring(ast.parse((ROOT / "common" / package / "__init__.py").read_text()))
    assert doc and len(doc) > 40, f"common/{package}/__init__.py needs a docstring saying what lives there"


def test_the_staged_app_bundle_holds_only_the_runtime_packages(tmp_path):
    from simulations.launcher import stage_app

    app = stage_app(tmp_path / "app")
    assert (app / "pyproject.toml").is_file()
    for package in ("client", "server", "common/core", "common/privacy", "common/federated"):
        assert (app / package / "__init__.py").is_file(), package
    assert not (app / "common" / "analysis").exists()
    assert not (app / "simulations").exists() and not (app / "tests").exists()
    assert (app / "common" / "assets").is_dir()


def test_the_readme_table_matches_the_tree():
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## What is where"):readme.index("## Phantoms")]
    listed = set(re.findall(r"^\| `([a-z_/]+)/` \|", table, re.M))
    packages = {f"common/{p.name}" for p in (ROOT / "common").iterdir() if (p / "__init__.py").is_file()}
    tops = {"client", "server", "simulations", "tests"}
    assert listed == packages | tops, f"README lists {sorted(listed)}; the tree has {sorted(packages | tops)}"
