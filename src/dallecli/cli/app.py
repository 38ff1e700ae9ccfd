"""The ``dalle`` Typer application: one command per module, assembled here."""

from __future__ import annotations

from typing import Annotated

import typer

from dallecli import __version__
from dallecli.cli.download import download
from dallecli.cli.edit import edit
from dallecli.cli.finetune import finetune
from dallecli.cli.batch import batch
from dallecli.cli.doctor import doctor
from dallecli.cli.generate import generate
from dallecli.cli.info import info
from dallecli.cli.score import score
from dallecli.cli.models import models_app
from dallecli.cli.variations import variations
from dallecli.cli.upscale import upscale
from dallecli.cli.serve import serve

app = typer.Typer(
    name="dalle",
    help="Turn text into images on your own machine.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain Click help: Typer's Rich help imports rich.markdown and markdown_it (~120 ms), a third of the
    # 0.3 s start-up budget of `dalle generate --help`.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dalle {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    # A plain bool, not Optional[bool]: Typer coerces anything else through pydantic (~90 ms of imports),
    # and this eager option is processed on every invocation, `--help` included.
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Turn text into images on your own machine."""


app.command("generate")(generate)
app.command("edit")(edit)
app.command("variations")(variations)
app.command("batch")(batch)
app.command("upscale")(upscale)
app.command("download")(download)
app.command("finetune")(finetune)
app.add_typer(models_app, name="models")
app.command("info")(info)
app.command("score")(score)
app.command("doctor")(doctor)
app.command("serve")(serve)


def main() -> None:
    """Console-script entry point."""
    import signal

    from dallecli.cli.errors import interrupt_once
    from dallecli.engine.threads import mark_start

    mark_start()  # the thread policy measures other processes' CPU use while torch imports
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, interrupt_once)  # a second Ctrl-C cannot interrupt the clean-up
    app()
