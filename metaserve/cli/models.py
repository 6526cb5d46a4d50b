"""``metaserve models create|register|alias|list|show``: registered models from the shell (keep
a job's result under a name, as numbered versions with aliases), through :mod:`metaserve.client`.
``metaserve fetch`` and the SDK load a version by its URI, ``models:/NAME@ALIAS``."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from metaserve.cli.common import ClientErrors, OutputFormat, OutputOption, connect, print_json, printable

models_app = typer.Typer(help="Registered models: keep a result under a name, with versions "
                              "and aliases (models:/NAME@ALIAS).", no_args_is_help=True)
NameArgument = Annotated[str, typer.Argument(help="The registered model's name.", metavar="NAME")]


def _aliases(aliases: dict[str, int]) -> str:
    return ", ".join(f"{alias}→{version}" for alias, version in aliases.items()) or "—"


def version_line(version: dict[str, Any]) -> str:
    aliases = f"  @{', @'.join(version['aliases'])}" if version["aliases"] else ""
    source = f" (sweep {version['sweep_id']})" if version.get("sweep_id") else ""
    return (f"{version['uri']}  job {version['job_id']}{source}  {version['artifact_kind']}"
            f"{aliases}")


@models_app.command("create")
def create(name: NameArgument,
           description: Annotated[Optional[str], typer.Option(help="Free text.")] = None) -> None:
    """A new registered model with no versions yet."""
    with ClientErrors(), connect() as client:
        model = client.create_model(name, description=description)
    typer.echo(printable(f"created model {model['name']}"))


@models_app.command("register")
def register(name: NameArgument,
             job: Annotated[Optional[str], typer.Option(help="A succeeded job's id.")] = None,
             sweep: Annotated[Optional[str], typer.Option(help="A sweep's id: its best "
                                                          "succeeded trial.")] = None,
             alias: Annotated[Optional[str], typer.Option(help="Also point this alias at the "
                                                          "new version.")] = None,
             description: Annotated[Optional[str], typer.Option(help="Free text.")] = None
             ) -> None:
    """A new version of NAME from --job or --sweep (the model is created if you have none of
    that name); prints its URI."""
    with ClientErrors(), connect() as client:
        version = client.register_model(name, job=job, sweep=sweep, description=description)
        if alias:
            version = client.set_model_alias(name, alias, version["version"])
    typer.echo(printable(version_line(version)))


@models_app.command("alias")
def alias(name: NameArgument,
          alias_name: Annotated[str, typer.Argument(help="The alias, e.g. production.",
                                                    metavar="ALIAS")],
          version: Annotated[Optional[int], typer.Argument(help="The version it points at from "
                                                           "now on.", metavar="VERSION")] = None,
          delete: Annotated[bool, typer.Option("--delete", help="Remove the alias.")] = False
          ) -> None:
    """Point ALIAS at VERSION (created, or moved); without VERSION, show where it points."""
    with ClientErrors(), connect() as client:
        if delete:
            client.delete_model_alias(name, alias_name)
            typer.echo(printable(f"removed alias {alias_name} of {name}"))
            return
        if version is None:
            found = client.resolve_model_uri(f"models:/{name}@{alias_name}")
        else:
            found = client.set_model_alias(name, alias_name, version)
    typer.echo(printable(version_line(found)))


@models_app.command("list")
def list_models(output: OutputOption = OutputFormat.table) -> None:
    """Your registered models, their latest version and aliases."""
    with ClientErrors(), connect() as client:
        models = client.models()
    if output is OutputFormat.json:
        print_json(models)
        return
    if not models:
        typer.echo("no registered models (metaserve models register NAME --job JOB)")
        return
    for model in models:
        latest = model["latest_version"] or "—"
        typer.echo(printable(f"{model['name']}  latest {latest}  {model['version_count']} "
                             f"versions  aliases: {_aliases(model['aliases'])}"))


@models_app.command("show")
def show(name: NameArgument, output: OutputOption = OutputFormat.table) -> None:
    """The model and each of its versions, newest first."""
    with ClientErrors(), connect() as client:
        model, versions = client.model(name), client.model_versions(name)
    if output is OutputFormat.json:
        print_json({**model, "versions": versions})
        return
    typer.echo(printable(f"{model['name']}: {model['description'] or 'no description'}"))
    for version in versions:
        typer.echo(printable(f"  {version_line(version)}"))
