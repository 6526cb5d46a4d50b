"""The import graph of the whole tree: no module of ``api/ service/ workers/ metaserve/
migrations/`` is on an import cycle, and imports point one way, ``api → service → workers``.

Every ``import`` and ``from … import`` counts wherever it stands (module level, inside a
function, under ``if TYPE_CHECKING``), relative ones resolved against the importing module's
package, and so does ``importlib.import_module("<literal>")``; ``from a import b`` imports ``a``
and, when ``a.b`` is a module, ``a.b``. Names a registry builds at run time from data (the task
families' and RL algorithms' ``"module:Class"`` tables) are loaded on use and are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> the import name it installs as (pyproject.toml's package-dir)
PACKAGES = {"api": "metaserve.api", "service": "metaserve.service", "workers": "metaserve.workers",
            "migrations": "metaserve.migrations", "metaserve": "metaserve"}
# What each layer may import besides itself: api -> service -> workers, never back; the
# migrations read the service's tables. The client side (metaserve/ folder): the SDK talks
# HTTP and loads artifacts with the engine, never the server's code; the CLI wires every
# layer; the ``metaserve`` package itself is the SDK's door (``from metaserve import Client``).
MAY_IMPORT = {
    "metaserve.api": {"metaserve.service", "metaserve.workers"},
    "metaserve.migrations": {"metaserve.service", "metaserve.workers"},
    "metaserve.service": {"metaserve.workers"},
    "metaserve.workers": set(),
    "metaserve.client": {"metaserve.workers"},
    "metaserve.cli": {"metaserve.client", "metaserve.api", "metaserve.service", "metaserve.workers"},
    "metaserve": {"metaserve.client"},
}


def module_files() -> dict[str, Path]:
    """Every module of the tree by its import name (a package by its ``__init__.py``)."""
    modules = {}
    for folder, prefix in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [part for part in path.relative_to(ROOT / folder).with_suffix("").parts
                     if part != "__init__"]
            modules[".".join([prefix, *parts])] = path
    return modules


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """``node``'s module as an absolute name (``from ..x import y`` in ``a.b.c`` is ``a.x``)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path) -> set[str]:
    """The names ``module`` imports anywhere in its body."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path, node)
            imported.add(source)
            imported.update(f"{source}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            imported.add(node.args[0].value)
    return imported


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports."""
    modules = module_files()
    return {name: {imported for imported in imports_of(name, path)
                   if imported in modules and imported != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def layer(module: str) -> str:
    """The layer a module belongs to: the longest prefix of :data:`MAY_IMPORT` it starts with."""
    return max((prefix for prefix in MAY_IMPORT if module == prefix or module.startswith(prefix + ".")),
               key=len)


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {imported}" for module, imported_set in graph.items()
                  for imported in imported_set
                  if layer(imported) != layer(module) and layer(imported) not in MAY_IMPORT[layer(module)])


def test_the_cycle_finder_finds_each_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"a"}}
    assert cycles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_at_any_depth_and_relative_ones_are_edges(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("import importlib\n"
                      "from . import sibling\n"
                      "from ..other import thing\n"
                      "def f():\n"
                      "    from metaserve.workers import spec\n"
                      "    importlib.import_module('metaserve.workers.cost')\n")
    assert imports_of("metaserve.service.pkg.mod", source) == {
        "importlib", "metaserve.service.pkg", "metaserve.service.pkg.sibling",
        "metaserve.service.other", "metaserve.service.other.thing",
        "metaserve.workers", "metaserve.workers.spec", "metaserve.workers.cost"}


def test_the_layering_check_refuses_an_import_back_up():
    graph = {"metaserve.api.app": {"metaserve.service.jobs"},
             "metaserve.service.jobs": {"metaserve.workers.spec", "metaserve.api.schemas"},
             "metaserve.workers.spec": {"metaserve.service.settings"}}
    assert layering_violations(graph) == [
        "metaserve.service.jobs imports metaserve.api.schemas",
        "metaserve.workers.spec imports metaserve.service.settings"]


def test_no_module_of_the_tree_is_on_an_import_cycle():
    graph = import_graph()
    # the graph covers the whole tree, function-level imports included
    assert {"metaserve.api.app", "metaserve.service.dispatcher", "metaserve.workers.registry",
            "metaserve.migrations.env", "metaserve", "metaserve.client", "metaserve.cli"} <= set(graph)
    # the run contract's own rules: the schedule does not know the meta-learning arithmetic,
    # and the meta-learning runner does not know meta-RL
    assert "metaserve.workers.engine.trainer" not in graph["metaserve.workers.engine.loop"]
    assert not any(module.startswith("metaserve.workers.rl") for module in graph["metaserve.workers.runner"])
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in found)


def test_imports_point_one_way_api_service_workers():
    violations = layering_violations(import_graph())
    assert not violations, "imports against api -> service -> workers:\n" + "\n".join(violations)
