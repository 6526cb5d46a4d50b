"""docs/ARCHITECTURE.md stays true: every path it names exists, and every name it gives right
after a module's path (```service/jobs.py` `submit_job```) is defined in that module (a
function, class or assignment at its top level, or ``Class.method``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PATH = re.compile(r"`((?:api|service|workers|migrations|metaserve|docs|examples|tests)/[\w./-]*)`")
NAMED = re.compile(r"`((?:api|service|workers|metaserve)/[\w/]+\.py)`\s+`([\w.]+)`")


def defined_names(path: Path) -> set[str]:
    """Top-level names of a module, and ``Class.member`` for its classes' members."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names.update(f"{node.name}.{member.name}" for member in node.body
                             if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


def test_every_path_the_architecture_page_names_exists():
    paths = PATH.findall(DOC.read_text())
    assert len(paths) > 40
    assert [path for path in paths if not (ROOT / path).exists()] == []


def test_every_name_given_after_a_module_is_defined_there():
    named = NAMED.findall(DOC.read_text())
    assert len(named) > 20
    missing = [f"{path} {name}" for path, name in named if name not in defined_names(ROOT / path)]
    assert missing == []


def test_the_checker_catches_a_renamed_function(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("class Store:\n    def put(self): ...\ndef submit_job(): ...\nLIMIT = 1\n")
    assert defined_names(module) == {"Store", "Store.put", "submit_job", "LIMIT"}
