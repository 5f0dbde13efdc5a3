"""Architecture rules, checked on the source with ``ast`` (nothing is imported):

* no import cycle among the modules of ``tnmoe/`` nor among those of ``recipes/``;
* ``tnmoe.networks`` does not import (directly or through other modules) ``tnmoe.moe`` or
  ``tnmoe.models``; ``tnmoe.moe``'s modules do not import ``tnmoe.models`` (only the namespace
  ``tnmoe.moe/__init__`` serves its names), and ``tnmoe.models`` imports ``tnmoe.moe``'s
  submodules, never the namespace;
* the recipes use tnmoe's public API only: no ``_private`` names, only names a module exports.

Import graph: one node per module (a package is its ``__init__``). Every import counts, also
those inside functions (lazy imports are how cycles hide) and ``importlib.import_module("...")``
with a literal name; only imports under ``if TYPE_CHECKING:`` are left out (they never run).
``from pkg import name`` is an edge to the submodule ``pkg.name`` when there is one, else to
``pkg`` itself (its ``__init__`` re-exports the name), so a module that imports its own package
from inside depends on that package's ``__init__``. The implicit import of a module's parent
packages is not an edge (otherwise every ``__init__`` that imports a submodule would be a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

Graph = dict[str, set[str]]


# --- module discovery -----------------------------------------------------------------------------
def package_modules(root: Path, package: str) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package tree ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(not (root.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            continue  # not inside a regular package
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def flat_modules(folder: Path) -> dict[str, Path]:
    """``{name: file}`` of the scripts in ``folder`` that import each other by bare name."""
    return {p.stem: p for p in sorted(folder.glob("*.py"))}


# --- imports --------------------------------------------------------------------------------------
def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(path: Path, module: str, is_package: bool) -> list[tuple[str, str | None, int]]:
    """``(module imported, name taken from it or None, line)`` for every runtime import in ``path``;
    relative imports resolved against ``module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out += [(target, a.name, node.lineno) for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node.args[0].value, None, node.lineno))
    return out


def top_level_names(path: Path) -> set[str]:
    """Names a module binds at its top level (defs, classes, assignments, ``from .x import name``),
    leaving out ``from . import sub`` (that binds the submodule itself)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
    return names


def from_import_target(modules: dict[str, Path], package: str, name: str) -> tuple[str, str | None]:
    """What ``from package import name`` takes: ``(package.name, None)`` for a submodule, or
    ``(package, name)`` for a name the package's ``__init__`` binds (a re-export wins over a
    submodule of the same name, as at run time)."""
    sub = f"{package}.{name}"
    if sub in modules and not (package in modules and name in top_level_names(modules[package])):
        return sub, None
    return package, name


def import_graph(modules: dict[str, Path]) -> Graph:
    """Edges between ``modules`` only (see the module docstring for how imports map to edges)."""
    graph: Graph = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for target, name, _ in imported_names(path, module, is_package):
            if name is not None:
                target = from_import_target(modules, target, name)[0]
            if target in modules:
                dep = target
            else:  # the deepest known module on the dotted path
                parts = target.split(".")
                dep = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules),
                           None)
            if dep is not None and dep != module:
                graph[module].add(dep)
    return graph


# --- cycles ---------------------------------------------------------------------------------------
def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` for each strongly connected component with more than one
    node (Tarjan), sorted, so an empty list means the graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(_cycle_in(graph, comp) for comp in components)


def _cycle_in(graph: Graph, component: list[str]) -> list[str]:
    """A shortest cycle through the component's first node, staying inside the component."""
    start = component[0]
    paths = reachable(graph, start, within=set(component))
    return min((paths[v] for v in paths if start in graph.get(v, ())), key=lambda p: (len(p), p)) + [start]


def reachable(graph: Graph, start: str, within: set[str] | None = None) -> dict[str, list[str]]:
    """``{module: shortest import path from start}`` for every module ``start`` imports, directly
    or not (only through modules in ``within``, if given)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in paths and (within is None or w in within):
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return paths


# --- the rules ------------------------------------------------------------------------------------
TNMOE = package_modules(ROOT, "tnmoe")
RECIPES = flat_modules(ROOT / "recipes")


def _describe(cycles: list[list[str]]) -> str:
    return "; ".join(" -> ".join(c) for c in cycles)


def test_no_import_cycle_in_tnmoe():
    assert {"tnmoe", "tnmoe.moe", "tnmoe.networks", "tnmoe.models.convert"} <= set(TNMOE)
    cycles = find_cycles(import_graph(TNMOE))
    assert not cycles, f"import cycles in tnmoe/: {_describe(cycles)}"


def test_no_import_cycle_in_recipes():
    graph = import_graph(RECIPES)
    assert "variants" in graph["glue"]  # the graph sees the recipes' bare-name imports
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles in recipes/: {_describe(cycles)}"


def _in(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def _assert_no_path(graph: Graph, sources, forbidden, what: str) -> None:
    for module in sources:
        bad = {dep: path for dep, path in reachable(graph, module).items() if forbidden(dep)}
        assert not bad, f"{module} {what}: " + "; ".join(" -> ".join(p) for p in bad.values())


def test_networks_does_not_import_moe_or_models():
    graph = import_graph(TNMOE)
    _assert_no_path(graph, [m for m in TNMOE if _in("tnmoe.networks", m)],
                    lambda dep: _in("tnmoe.moe", dep) or _in("tnmoe.models", dep), "imports the MoE layer or model code")


def test_the_moe_layer_does_not_import_model_code():
    """``tnmoe.moe``'s modules (routers, banks, experts, dispatch, losses, mask) know nothing of
    whole models; only the package ``__init__`` serves :mod:`tnmoe.models`' names (lazily)."""
    graph = import_graph(TNMOE)
    layer = [m for m in TNMOE if _in("tnmoe.moe", m) and m != "tnmoe.moe"]
    assert {"tnmoe.moe.layer", "tnmoe.moe.banks", "tnmoe.moe.gradient_mask"} <= set(layer)
    _assert_no_path(graph, layer, lambda dep: _in("tnmoe.models", dep), "imports model-level code")


def test_model_code_imports_the_layer_modules_not_the_moe_namespace():
    """``tnmoe.models`` imports ``tnmoe.moe.<module>``, never the ``tnmoe.moe`` namespace itself,
    which serves the model code's names: importing it from there would be a cycle."""
    graph = import_graph(TNMOE)
    models = [m for m in TNMOE if _in("tnmoe.models", m)]
    assert {"tnmoe.models.convert", "tnmoe.models.persistence", "tnmoe.models.adapters"} <= set(models)
    for module in models:
        assert "tnmoe.moe" not in graph[module], f"{module} imports the tnmoe.moe namespace; import its submodules"


def test_every_package_imports_first_in_a_fresh_process():
    """The lazy split between the layer and the model code holds whichever module a user imports
    first (one fresh interpreter per entry point, run side by side)."""
    import subprocess
    import sys

    firsts = ["tnmoe.models", "tnmoe.models.persistence", "tnmoe.models.trainer", "tnmoe.moe.layer"]
    procs = {first: subprocess.Popen(
        [sys.executable, "-c", f"import {first}\nimport tnmoe.moe as moe\nassert callable(moe.convert) and moe.MoETrainer"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for first in firsts}
    failed = {}
    for first, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed[first] = err[-1500:]
    assert not failed, failed


def _module_all(module: str) -> set[str] | None:
    """The ``__all__`` of a tnmoe module (a literal list, or a sum of literal lists bound to names
    at the module's top level), or None if it has none."""
    tree = ast.parse(TNMOE[module].read_text(encoding="utf-8"))
    lists: dict[str, list] = {}

    def value(node: ast.expr) -> list:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return value(node.left) + value(node.right)
        if isinstance(node, ast.Name):
            return lists[node.id]
        return list(ast.literal_eval(node))

    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "__all__":
                return set(value(node.value))
            try:
                lists[node.targets[0].id] = value(node.value)
            except (ValueError, KeyError, TypeError, SyntaxError):
                pass
    return None


def tnmoe_uses(path: Path) -> list[tuple[str, str, int]]:
    """``(tnmoe module, name used from it, line)``: every ``from tnmoe... import name`` and every
    attribute read off a name bound to a tnmoe module (``import tnmoe.moe as moe``; ``moe.x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "tnmoe":
                    aliases[a.asname or "tnmoe"] = a.name if a.asname else "tnmoe"
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "tnmoe":
            for a in node.names:
                module, name = from_import_target(TNMOE, node.module, a.name)
                if name is None:
                    aliases[a.asname or a.name] = module
                else:
                    uses.append((module, name, node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in aliases:
                continue
            module = aliases[base.id]
            for attr in chain:
                module, name = from_import_target(TNMOE, module, attr)
                if name is not None:
                    uses.append((module, name, node.lineno))
                    break
    return sorted(set(uses))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_recipes_use_no_private_tnmoe_names():
    bad = []
    for name, path in RECIPES.items():
        for module, used, line in tnmoe_uses(path):
            if _private(used) or any(_private(p) for p in module.split(".")):
                bad.append(f"recipes/{name}.py:{line}: {module}.{used}")
    assert not bad, "private tnmoe names used by recipes: " + ", ".join(bad)


def test_recipes_use_only_exported_tnmoe_names():
    bad, seen = [], set()
    for name, path in RECIPES.items():
        for module, used, line in tnmoe_uses(path):
            seen.add((module, used))
            exported = _module_all(module)
            if exported is not None and used not in exported:
                bad.append(f"recipes/{name}.py:{line}: {module}.{used} (not in {module}.__all__)")
    assert ("tnmoe.moe", "convert") in seen and ("tnmoe.moe", "MoEConfig") in seen  # the scan sees `moe.x`
    assert not bad, "recipes use names tnmoe does not export: " + ", ".join(bad)


# --- self-tests of the machinery ------------------------------------------------------------------
def test_find_cycles_on_synthetic_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    two = find_cycles({"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"z"}, "z": {"x", "a"}})
    assert two == [["a", "b", "a"], ["x", "y", "z", "x"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []  # a diamond is no cycle
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a")["c"] == ["a", "b", "c"]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_graph_sees_lazy_and_reexport_cycles(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .sub import thing\n",
        "pkg/sub/__init__.py": "from .a import thing\n",
        "pkg/sub/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import C\n"
                        "def thing():\n    from ..b import helper\n    return helper()\n",
        "pkg/b.py": "def helper():\n    import pkg.sub as s  # lazy, and through the package __init__\n    return s\n",
        "pkg/c.py": "import importlib\nm = importlib.import_module('pkg.b')\nfrom . import b, thing\n",
        "pkg/d/__init__.py": "from .d import d\n",  # the function d shadows the submodule d
        "pkg/d/d.py": "def d():\n    pass\n",
        "pkg/e.py": "from .d import d\n",
    })
    modules = package_modules(tmp_path, "pkg")
    graph = import_graph(modules)
    assert graph == {"pkg": {"pkg.sub"}, "pkg.sub": {"pkg.sub.a"}, "pkg.sub.a": {"pkg.b"},
                     "pkg.b": {"pkg.sub"}, "pkg.c": {"pkg", "pkg.b"}, "pkg.d": {"pkg.d.d"}, "pkg.d.d": set(),
                     "pkg.e": {"pkg.d"}}
    assert find_cycles(graph) == [["pkg.b", "pkg.sub", "pkg.sub.a", "pkg.b"]]
    # without the lazy import the tree is acyclic; the TYPE_CHECKING import never counted
    _write(tmp_path, {"pkg/b.py": "def helper():\n    return 1\n"})
    assert find_cycles(import_graph(package_modules(tmp_path, "pkg"))) == []


def test_flat_graph_and_public_name_scan(tmp_path):
    _write(tmp_path, {"r/one.py": "import two\n", "r/two.py": "def f():\n    from one import x\n",
                      "r/three.py": "import tnmoe.moe as moe\nfrom tnmoe.networks import factorize\n"
                                    "moe.convert(None)\nmoe._hidden\nmoe.layer.moe_layers\n"})
    assert find_cycles(import_graph(flat_modules(tmp_path / "r"))) == [["one", "two", "one"]]
    assert tnmoe_uses(tmp_path / "r" / "three.py") == [
        ("tnmoe.moe", "_hidden", 4), ("tnmoe.moe", "convert", 3), ("tnmoe.moe.layer", "moe_layers", 5),
        ("tnmoe.networks", "factorize", 2)]  # the function the package exports, not the submodule


@pytest.mark.parametrize("name", ["_x", "_hidden_helper"])
def test_private_rule(name):
    assert _private(name) and not _private("__version__") and not _private("convert")
