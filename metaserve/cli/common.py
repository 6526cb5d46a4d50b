"""What every ``metaserve`` command shares: text from a server printed safely
(:func:`printable`), an error as one line on stderr and exit code 1 (:func:`fail`,
:class:`ClientErrors`), the client of the commands that talk to a server (:func:`connect`), and
the table/JSON output option."""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Optional

import typer

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    """``value`` as text with every control character (C0, DEL, C1: ESC, CSI, BEL, CR, ...)
    written as its escape (``\\x1b``), so server-supplied text cannot drive the terminal."""
    return CONTROL_CHARACTERS.sub(lambda found: found.group().encode("unicode_escape").decode(),
                                  str(value))


def fail(message: str) -> typer.Exit:
    """Print ``message`` as ``error: ...`` on stderr (its further lines under it) and return the
    exit (code 1) to raise."""
    first, *more = message.split("\n")
    typer.echo("\n".join([f"error: {printable(first)}", *(printable(line) for line in more)]),
               err=True)
    return typer.Exit(1)


class ClientErrors:
    """Turns SDK errors (and a missing file) into one line on stderr and exit code 1."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        from metaserve.client import MetaserveClientError

        if exc is None or isinstance(exc, (typer.Exit, typer.Abort)):
            return False
        if isinstance(exc, MetaserveClientError):
            # A 422 names each bad field: one line each, under the message.
            details = (getattr(exc, "details", None) or []
                       if getattr(exc, "status_code", None) == 422 else [])
            lines = [str(exc)] + [f"  {detail.get('field') or 'request'}: {detail.get('message')}"
                                  for detail in details if isinstance(detail, dict)]
            raise fail("\n".join(lines)) from None
        if isinstance(exc, OSError):
            raise fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from None
        return False


def connect(url: Optional[str] = None, api_key: Optional[str] = None):  # noqa: ANN202
    """The client of the commands that talk to a server (the client is imported on use: the
    operator's commands never load it)."""
    from metaserve.client import Client

    return Client(url=url, api_key=api_key)


JobArgument = Annotated[str, typer.Argument(help="Job id (as printed by submit or list).", metavar="JOB")]


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


OutputOption = Annotated[OutputFormat, typer.Option(
    "--output", "-o", help="table (for people) or json (the API's objects, for scripts).")]


def print_json(value: object) -> None:
    import json

    typer.echo(json.dumps(value, indent=2, sort_keys=True))
