"""The run contract's modules import one way: no module of the engine, the meta-RL package, the
runner, the registry or the supervisor is on an import cycle (imports inside functions count:
``workers/runner.py`` and ``workers/rl/job.py`` used to import each other that way, and
``engine/loop.py`` and ``engine/trainer.py`` through the engine package)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"api": "metaserve.api", "service": "metaserve.service", "workers": "metaserve.workers",
            "migrations": "metaserve.migrations", "metaserve": "metaserve"}
CONTRACT = ("metaserve.workers.engine", "metaserve.workers.rl", "metaserve.workers.runner",
            "metaserve.workers.registry", "metaserve.workers.supervisor",
            "metaserve.workers.exceptions", "metaserve.service.sdk")


def module_files() -> dict[str, Path]:
    modules = {}
    for folder, prefix in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [part for part in path.relative_to(ROOT / folder).with_suffix("").parts
                     if part != "__init__"]
            modules[".".join([prefix, *parts])] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports anywhere in its body (``from a import b``
    counts as importing ``a`` and, when it is a module, ``a.b``)."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_of_the_run_contract_is_on_an_import_cycle():
    graph = import_graph()
    assert "metaserve.workers.registry" in graph and "metaserve.workers.rl.driver" in graph
    on_cycles = [component for component in cycles(graph)
                 if any(module.startswith(CONTRACT) for module in component)]
    assert on_cycles == []
    assert "metaserve.workers.engine.trainer" not in graph["metaserve.workers.engine.loop"]
    assert not any(module.startswith("metaserve.workers.rl") for module in graph["metaserve.workers.runner"])
