"""The ``dalle`` Typer application: one command per module, assembled here."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dallecli import __version__
from dallecli.cli.download import download
from dallecli.cli.finetune import finetune
from dallecli.cli.batch import batch
from dallecli.cli.doctor import doctor
from dallecli.cli.generate import generate
from dallecli.cli.info import info
from dallecli.cli.models import models_app

app = typer.Typer(
    name="dalle",
    help="Turn text into images on your own machine.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dalle {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
) -> None:
    """Turn text into images on your own machine."""


app.command("generate")(generate)
app.command("batch")(batch)
app.command("download")(download)
app.command("finetune")(finetune)
app.add_typer(models_app, name="models")
app.command("info")(info)
app.command("doctor")(doctor)


def main() -> None:
    """Console-script entry point."""
    app()
