"""A job or sweep document as the client sends it: a dict, or a YAML/JSON file, with
``key.path=value`` overrides. The client only reads and merges; validation is the server's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaserve.client.errors import MetaserveClientError


def load_spec_document(spec_or_path: str | Path | dict[str, Any],
                       overrides: list[str] | None = None) -> dict[str, Any]:
    """A job spec document from a dict or a YAML/JSON file, with ``key.path=value`` overrides
    (values parsed as YAML). Validation is the server's."""
    import yaml

    from metaserve.workers.cli import apply_overrides

    if isinstance(spec_or_path, dict):
        document: Any = spec_or_path
    else:
        path = Path(spec_or_path)
        try:
            document = yaml.safe_load(path.read_text())
        except OSError as error:
            raise MetaserveClientError(f"cannot read {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise MetaserveClientError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
        if not isinstance(document, dict):
            raise MetaserveClientError(f"{path}: a job spec is a mapping")
    try:
        return apply_overrides(document, overrides or [])
    except Exception as error:  # typer.BadParameter: its message says what is wrong
        raise MetaserveClientError(str(getattr(error, "message", error))) from None


def _yaml_problem(error: Exception) -> str:
    """A YAML error as one line: where (line, column) and what, without the quoted source."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"
