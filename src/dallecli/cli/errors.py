"""The one place where errors become a one-line message on stderr and an exit code.

Exit codes: 1 runtime error (file-system errors included), 2 usage error, 3 out of memory, 130 interrupted (Ctrl-C).
``DALLE_DEBUG=1`` re-raises so the traceback shows.
"""

from __future__ import annotations

import functools

import typer

from dallecli.config import debug_enabled
from dallecli.errors import DalleError

EXIT_INTERRUPTED = 130


def handles_errors(command):
    """Decorate a Typer command so that DalleError and Ctrl-C end it with a message and exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from dallecli.cli.console import err

        try:
            return command(*args, **kwargs)
        except DalleError as exc:
            if debug_enabled():
                raise
            err().print(f"error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # the file system refused something the checks could not foresee
            if debug_enabled():
                raise
            where = f": {exc.filename}" if exc.filename else ""
            err().print(f"error: {exc.strerror or exc}{where}", markup=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            err().print("interrupted", markup=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper
