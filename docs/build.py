"""Builds the generated documentation pages, so that they cannot drift from what they describe.

- ``docs/SETTINGS.md`` from the ``Settings`` class (``service/settings.py``): every field's
  environment variable, type, default, bounds and description.
- ``docs/BENCHMARKS.md`` (and any other page with a template in ``docs/templates/``) from the
  raw results in ``benchmarks/results/``: the template holds the headings and one short paragraph
  per table; each table is a ``<!-- table ... -->`` block of YAML saying where its rows come
  from and how each column is written (``docs/templates/README.md`` describes the block).

``python docs/build.py [PAGE ...]`` writes the pages (all, or those named, e.g.
``BENCHMARKS.md``); ``--check`` exits 1 and names each page that differs from what would be written (tests/test_generated_docs.py runs the same
comparison).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import string
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "docs" / "templates"
MISSING = "–"
NOT_IN_JSON = "not in the raw JSON"
TABLE_BLOCK = re.compile(r"^<!-- table\n(?P<spec>.*?)^-->\n", re.MULTILINE | re.DOTALL)
RUN_FIELDS = ("command", "hardware", "seeds", "date")


# --------------------------------------------------------------------------- results tables


class TemplateError(ValueError):
    """A table block of a template is malformed or names a raw file that does not exist."""


def resolve(document: Any, path: str) -> Any:
    """The value at a dotted ``path`` (``a.b.0.c``; ``.`` is the document itself); KeyError
    when any part is absent."""
    if path == ".":
        return document
    value = document
    for part in path.split("."):
        if isinstance(value, list):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(path)
    return value


class _Row(dict):
    """A row's namespace for ``str.format``: a field the JSON lacks is a KeyError that the
    cell turns into ``MISSING`` (never a made-up value)."""


class _Formatter(string.Formatter):
    def get_field(self, field_name: str, args, kwargs):  # noqa: ANN001, ANN201
        value, first = super().get_field(field_name, args, kwargs)
        if value is None:
            raise KeyError(field_name)
        return value, first


FORMATTER = _Formatter()


def _rows_of(document: Any, path: str, source: str) -> list[dict[str, Any]]:
    try:
        selected = resolve(document, path)
    except (KeyError, IndexError, ValueError):
        raise TemplateError(f"{source}: no {path!r} in the raw JSON") from None
    if isinstance(selected, dict) and path == ".":
        return [dict(selected)]
    if isinstance(selected, dict):
        return [{"key": key, **(value if isinstance(value, dict) else {"value": value})}
                for key, value in selected.items()]
    if isinstance(selected, list):
        return [row if isinstance(row, dict) else {"value": row} for row in selected]
    raise TemplateError(f"{source}: {path!r} is neither a list nor an object")


def _grouped(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """One row per distinct ``keys``, in first-seen order: the first row's fields, and for each
    numeric field ``mean_F``, ``min_F``, ``max_F``, ``values_F`` (comma-joined), plus ``n``."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(key) for key in keys), []).append(row)
    out = []
    for members in groups.values():
        merged: dict[str, Any] = {**members[0], "n": len(members)}
        for field in members[0]:
            values = [member[field] for member in members
                      if isinstance(member.get(field), (int, float))
                      and not isinstance(member.get(field), bool)]
            if values and len(values) == len(members):
                merged[f"mean_{field}"] = statistics.fmean(values)
                merged[f"min_{field}"] = min(values)
                merged[f"max_{field}"] = max(values)
                merged[f"values_{field}"] = ", ".join(str(value) for value in values)
        out.append(merged)
    return out


def _matches(value: Any, wanted: Any) -> bool:
    """``where``: equal to the wanted value, or one of a list of them."""
    return value in wanted if isinstance(wanted, list) else value == wanted


def _joinable(document: Any, path: str) -> dict[str, Any]:
    """``join``: the object at ``path``, whose entries are looked up by each row's ``key``."""
    try:
        found = resolve(document, path)
    except (KeyError, IndexError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _cell(template: str, row: dict[str, Any]) -> str:
    try:
        return FORMATTER.format(template, **row).replace("|", "\\|")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return MISSING


def _run_field(template: Any, document: Any) -> str:
    """A run-line field: a format string over the (first) raw JSON; a field it names that the
    JSON lacks makes the whole value ``NOT_IN_JSON``."""
    if not isinstance(document, dict):
        return str(template)
    namespace = {key: ", ".join(map(str, value)) if isinstance(value, list) else value
                 for key, value in document.items()}
    try:
        return FORMATTER.format(str(template), **namespace)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return NOT_IN_JSON


@dataclass
class Table:
    """One ``<!-- table -->`` block: where its rows come from and how each column is written."""

    raw: list[str]
    rows: str
    columns: dict[str, str]
    run: dict[str, Any]
    where: dict[str, Any]
    group_by: list[str]
    join: dict[str, str]

    @classmethod
    def parse(cls, text: str, source: str) -> "Table":
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise TemplateError(f"{source}: a table block is not YAML: {error}") from None
        if not isinstance(spec, dict) or "raw" not in spec or "columns" not in spec:
            raise TemplateError(f"{source}: a table block needs `raw` and `columns`")
        raw = spec["raw"] if isinstance(spec["raw"], list) else [spec["raw"]]
        unknown = set(spec) - {"raw", "rows", "columns", "where", "group_by", "join", *RUN_FIELDS}
        if unknown:
            raise TemplateError(f"{source}: unknown keys {sorted(unknown)}")
        return cls(raw=raw, rows=str(spec.get("rows", ".")), columns=dict(spec["columns"]),
                   run={field: spec[field] for field in RUN_FIELDS if field in spec},
                   where=dict(spec.get("where") or {}), group_by=list(spec.get("group_by") or []),
                   join=dict(spec.get("join") or {}))

    def render(self, repo: Path, page: Path) -> str:
        documents = []
        for name in self.raw:
            path = repo / name
            if not path.is_file():
                raise TemplateError(f"{page.name}: raw file {name} does not exist")
            documents.append((name, json.loads(path.read_text())))
        rows: list[dict[str, Any]] = []
        for name, document in documents:
            joined = {alias: _joinable(document, path) for alias, path in self.join.items()}
            for row in _rows_of(document, self.rows, name):
                extra = {alias: table.get(row.get("key"), {}) for alias, table in joined.items()}
                rows.append({**row, **extra, "file": Path(name).name, "root": document})
        rows = [row for row in rows if all(_matches(row.get(k), v) for k, v in self.where.items())]
        if self.group_by:
            rows = _grouped(rows, self.group_by)
        first = documents[0][1]
        links = ", ".join(f"[`{Path(name).name}`]({_relative(repo / name, page, repo)})"
                          for name, _ in documents)
        run = {field: _run_field(self.run[field], first) if field in self.run else NOT_IN_JSON
               for field in RUN_FIELDS}
        command = run["command"] if run["command"] == NOT_IN_JSON else f"`{run['command']}`"
        line = (f"Run: {command} · {run['hardware']} · seeds: {run['seeds']} · {run['date']} · "
                f"raw: {links}")
        lines = [line, "",
                 "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(" --- " for _ in self.columns) + "|"]
        for row in rows:
            lines.append("| " + " | ".join(_cell(template, row) for template in self.columns.values()) + " |")
        return "\n".join(lines) + "\n"


def _relative(target: Path, page: Path, repo: Path) -> str:
    """``target`` as a link from ``page`` (both under ``repo``)."""
    return Path(*([".."] * (len(page.relative_to(repo).parts) - 1)), target.relative_to(repo)).as_posix()


def render_template(template: str, repo: Path, page: Path) -> str:
    """The page: the template with each table block replaced by its rendered table."""
    def table(match: re.Match) -> str:
        return Table.parse(match.group("spec"), page.name).render(repo, page)

    header = (f"<!-- Generated by docs/build.py from docs/templates/{page.name} and the raw "
              "JSON it names; edit those, then run `python docs/build.py`. -->\n\n")
    return header + TABLE_BLOCK.sub(table, template)


# --------------------------------------------------------------------------- settings


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None) or str(annotation)
    return {"SecretStr": "secret string", "str": "string", "int": "integer", "float": "number",
            "bool": "boolean", "Path": "path"}.get(name, name)


def _bounds(field: Any) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = []
    for item in field.metadata:
        for attribute, symbol in symbols.items():
            value = getattr(item, attribute, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
        if getattr(item, "pattern", None):
            parts.append(f"matches `{item.pattern}`")
        if getattr(item, "min_length", None):
            parts.append(f"at least {item.min_length} character(s)")
    return ", ".join(parts)


def _default(value: Any) -> str:
    secret = getattr(value, "get_secret_value", None)
    if secret is not None:
        value = secret()
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int):
        return f"`{value}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def render_settings() -> str:
    """docs/SETTINGS.md: one row per field of ``Settings``, in the class's order."""
    from metaserve.service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    lines = [
        "<!-- Generated by docs/build.py from service/settings.py; edit the Settings class, then "
        "run `python docs/build.py`. -->",
        "",
        "# Server settings",
        "",
        f"Every setting of `metaserve serve` and the dispatcher is read from an environment "
        f"variable `{prefix}<NAME>` (pydantic-settings; booleans accept `true`/`false`/`1`/`0`). "
        "Clients (the CLI's HTTP commands, the SDK) read `METASERVE_URL` and `METASERVE_API_KEY` "
        "instead; those are not server settings. A value outside its bounds stops the server at "
        "start with a message naming the variable.",
        "",
        "| variable | type | default | bounds | what it does |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{prefix}{name.upper()}` | {_type_name(field.annotation)} | "
                     f"{_default(field.default)} | {_bounds(field)} | {description} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the pages


def pages(repo: Path = REPO, names: Iterable[str] = ()) -> dict[Path, str]:
    """The generated pages (those ``names``, e.g. ``BENCHMARKS.md``; all by default) and the
    text each should hold."""
    wanted = set(names)
    out = {repo / "docs" / "SETTINGS.md": render_settings()} if not wanted or "SETTINGS.md" in wanted else {}
    for template in sorted((repo / "docs" / "templates").glob("*.md")):
        if template.name == "README.md" or (wanted and template.name not in wanted):
            continue
        page = repo / "docs" / template.name
        out[page] = render_template(template.read_text(), repo, page)
    return out


def stale(repo: Path = REPO, names: Iterable[str] = ()) -> list[Path]:
    """The generated pages whose file differs from what would be written."""
    return [page for page, text in pages(repo, names).items()
            if not page.is_file() or page.read_text() != text]


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", metavar="PAGE",
                        help="only these pages (e.g. BENCHMARKS.md); all by default")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each page that is out of date")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.check:
        out_of_date = stale(names=args.pages)
        for page in out_of_date:
            print(f"{page.relative_to(REPO)} is out of date: run python docs/build.py", file=sys.stderr)
        return 1 if out_of_date else 0
    for page, text in pages(names=args.pages).items():
        page.write_text(text)
        print(f"wrote {page.relative_to(REPO)} ({len(text.encode()):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
