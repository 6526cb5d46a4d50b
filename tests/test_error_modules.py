"""One errors module per side, each exception defined once: the server's in
``service/exceptions.py`` (``MetaserveError`` and its subclasses, which ``api/errors.py`` maps to
HTTP), the engine's in ``workers/exceptions.py``, the client's in ``metaserve/client/errors.py``.
Found by walking the class bases of every module of the tree (an exception is a class whose
bases lead to a built-in exception)."""

from __future__ import annotations

import ast
import builtins
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("api", "service", "workers", "metaserve", "migrations")
ERROR_MODULES = {"service/exceptions.py", "workers/exceptions.py", "metaserve/client/errors.py"}
BUILTIN_EXCEPTIONS = {name for name, value in vars(builtins).items()
                      if isinstance(value, type) and issubclass(value, BaseException)}


def _base_name(base: ast.expr) -> str:
    return base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")


def _classes(tree: ast.AST, in_function: bool = False):  # noqa: ANN202 - (ClassDef, bool)s
    """Every class of ``tree`` and whether it is defined inside a function."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            yield node, in_function
        yield from _classes(node, in_function or isinstance(node, (ast.FunctionDef,
                                                                    ast.AsyncFunctionDef)))


def exception_classes(root: Path = ROOT) -> list[tuple[str, str]]:
    """``(module path, class name)`` of every exception class defined in the tree, but a
    private one inside a function: control flow that never leaves it (e.g. a parser callback
    stopping its parser), not an error of the side."""
    classes = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            for node, in_function in _classes(ast.parse(path.read_text(), str(path))):
                classes.append((path.relative_to(root).as_posix(), node.name,
                                [_base_name(base) for base in node.bases],
                                in_function and node.name.startswith("_")))
    exceptions = set(BUILTIN_EXCEPTIONS)
    grown = True
    while grown:  # a class is an exception when one of its bases is
        grown = False
        for _, name, bases, _ in classes:
            if name not in exceptions and any(base in exceptions for base in bases):
                exceptions.add(name)
                grown = True
    return [(path, name) for path, name, bases, local in classes
            if any(base in exceptions for base in bases) and not local]


def test_the_finder_sees_exceptions_through_their_bases(tmp_path):
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "exceptions.py").write_text("class MetaserveError(Exception): ...\n")
    (tmp_path / "service" / "routes.py").write_text(
        "class Denied(MetaserveError): ...\nclass Model: ...\nclass Worse(Denied): ...\n"
        "def parse():\n    class _Stop(Exception): ...\n    class Leaks(Exception): ...\n")
    assert exception_classes(tmp_path) == [("service/exceptions.py", "MetaserveError"),
                                           ("service/routes.py", "Denied"), ("service/routes.py", "Worse"),
                                           ("service/routes.py", "Leaks")]


def test_every_exception_is_defined_in_its_sides_errors_module():
    found = exception_classes()
    assert {path for path, _ in found} == ERROR_MODULES
    assert {name for path, name in found if path == "service/exceptions.py"} >= {
        "MetaserveError", "AdminOnly", "TooManyStreams", "InvalidCursor"}


def test_no_exception_is_defined_twice_on_one_side():
    twice = [(path, name) for (path, name), count in Counter(exception_classes()).items() if count > 1]
    assert twice == []
