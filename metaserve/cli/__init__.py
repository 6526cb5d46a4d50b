"""The ``metaserve`` command (pyproject's ``[project.scripts]``): the table below registers every
command, in the order ``metaserve --help`` lists them.

- :mod:`~metaserve.cli.operator`: ``serve``, ``dispatcher``, ``db``, ``keys`` (the server's
  host: settings and database, no HTTP);
- :mod:`~metaserve.cli.user`: ``train`` (the engine in-process) and the commands that talk to a
  server through :mod:`metaserve.client` (``login``, ``submit``, ``list``, ... ``datasets``);
- :mod:`~metaserve.cli.sweeps`: ``sweep``;
- :mod:`~metaserve.cli.models`: ``models`` (registered models, versions, aliases);
- :mod:`~metaserve.cli.common`: what they share (safe printing, one-line errors, the client).

The folder ``metaserve/`` installs as the package ``metaserve`` (pyproject's package-dir); the
CLI sits above every layer (it starts the API, the dispatcher, the client and the engine), so it
lives here rather than in ``service/`` (``tests/test_import_graph.py`` checks the layering).
"""

from __future__ import annotations

import sys

import typer
import typer.core

from metaserve.cli import models, operator, sweeps, user
from metaserve.cli.common import printable


class _OneLineErrors(typer.Typer):
    """The ``metaserve`` command: a usage error (unknown option, missing argument, bad value)
    is one line on stderr and exit code 1, like every other user error, instead of click's
    boxed usage text and exit code 2. ``metaserve`` alone prints the help and exits 0."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # click's usage errors (typer vendors click)
            context = getattr(error, "ctx", None)
            if type(error).__name__ == "NoArgsIsHelpError" and context is not None:
                typer.echo(context.get_help())
                sys.exit(0)
            hint = f" (see {context.command_path} --help)" if context is not None else ""
            message = error.format_message() if hasattr(error, "format_message") else str(error)
            typer.echo(f"error: {printable(message)}{hint}", err=True)
            sys.exit(1)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _flag_type(self, ctx):  # noqa: ANN001, ANN202 - typer's TyperOption.display_type_rich
    """No type tag for a flag (``--wait <bool>`` read as if it took a value); options that take
    one keep theirs (``--out <path>``)."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type

app = _OneLineErrors(help="metaserve: meta-learning jobs over REST, run on Ray.",
                     no_args_is_help=True, add_completion=False)

app.command()(operator.serve)
app.command(context_settings={"allow_extra_args": False})(user.train)
app.command()(operator.dispatcher)
app.command()(user.login)
app.command()(user.submit)
app.command("list")(user.list_command)
app.command()(user.status)
app.command()(user.metrics)
app.command()(user.wait)
app.command()(user.logs)
app.command()(user.cancel)
app.command()(user.fetch)
app.add_typer(operator.db_app, name="db")
app.add_typer(operator.keys_app, name="keys")
app.add_typer(user.datasets_app, name="datasets")
app.add_typer(sweeps.sweep_app, name="sweep")
app.add_typer(models.models_app, name="models")

__all__ = ["app"]
