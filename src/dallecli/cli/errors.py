"""The one place where errors become a one-line message on stderr and an exit code.

Exit codes: 1 runtime error (file-system errors and unforeseen faults included: one line, never a traceback),
2 usage error (a bad ``DALLE_*`` variable or config file included, refused before the command runs), 3 out of
memory, 130 interrupted (Ctrl-C). A reader that closes stdout early (``dalle batch f.txt | head -1``) ends the
command quietly with exit 1, as Python's documented SIGPIPE handling, Click and Rich (for stderr) do: no
message, no traceback, finished images kept. ``DALLE_DEBUG=1`` re-raises so the traceback shows.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import typer

from dallecli.config import debug_enabled
from dallecli.errors import DalleError, first_line

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 1  # as Python's docs, Click and Rich exit when their output pipe is closed


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the command's own account of what was kept (printed instead of a bare "interrupted")."""

# Library exceptions that reach the CLI although the engine checks its inputs first: (module prefix, class
# name) -> (exit code, what to do next). Matched by name along the exception's class hierarchy, so that
# nothing here imports huggingface_hub or diffusers at start-up.
LIBRARY_ERRORS: dict[tuple[str, str], tuple[int, str]] = {
    ("huggingface_hub", "HFValidationError"): (2, "give a registry alias (see `dalle models`), a folder or an org/name repo id"),
    ("huggingface_hub", "RepositoryNotFoundError"): (1, "check the name (see `dalle models`); a private or gated repo needs a token"),
    ("huggingface_hub", "RevisionNotFoundError"): (1, "check --revision"),
    ("huggingface_hub", "EntryNotFoundError"): (1, "the repo lacks a file dalle needs; run `dalle download NAME` again"),
    ("huggingface_hub", "LocalEntryNotFoundError"): (1, "the model is not (fully) downloaded; run `dalle download NAME`"),
    ("huggingface_hub", "OfflineModeIsEnabled"): (1, "unset HF_HUB_OFFLINE to reach the Hub"),
    ("huggingface_hub", "HfHubHTTPError"): (1, "check your connection (or HF_ENDPOINT) and run the command again"),
    ("safetensors", "SafetensorError"): (1, "the weights file is damaged; download it again"),
}


def library_error(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, one-line message)`` for a known library exception, or None."""
    for cls in type(exc).__mro__:
        root = cls.__module__.split(".")[0]
        hit = LIBRARY_ERRORS.get((root, cls.__name__))
        if hit is not None:
            code, advice = hit
            return code, f"{first_line(exc, cls.__name__).rstrip('.')}; {advice}"
    return None


def interrupt_once(signum, frame) -> None:
    """SIGINT handler (installed by the entry point): the first Ctrl-C raises KeyboardInterrupt, and later ones
    are ignored while the command cleans up and says "interrupted" once; a second Ctrl-C pressed while the
    first is being handled would otherwise land in the clean-up or the interpreter's exit, as a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def quiet_broken_pipe() -> None:
    """After stdout's reader went away (``dalle batch f.txt | head -1``): point stdout at /dev/null so that no
    later write or the interpreter's final flush raises again (Python's documented handling of SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (a test runner's capture): nothing to flush
        pass


def handles_errors(command=None, *, check_environment: bool = True):
    """Decorate a Typer command so that DalleError and Ctrl-C end it with a message and exit code.

    Used bare (``@handles_errors``) or with ``check_environment=False`` for a command that reports bad
    ``DALLE_*`` variables itself (``dalle doctor``) instead of refusing to run.
    """
    if command is None:
        return functools.partial(handles_errors, check_environment=check_environment)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from dallecli.cli.console import info

        try:
            if check_environment:
                from dallecli.config import check_environment as check

                check()  # DALLE_THREADS=abc, DALLE_DEVICE=bogus: refused before torch is imported
            return command(*args, **kwargs)
        except BrokenPipeError:  # the reader of stdout closed it: stop quietly; what finished is kept
            if debug_enabled():
                raise
            quiet_broken_pipe()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except DalleError as exc:
            if debug_enabled():
                raise
            info(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:  # noqa: BLE001 - only known library errors are translated; the rest re-raise
            if debug_enabled():
                raise
            known = library_error(exc)
            if known is not None:
                info(f"error: {known[1]}")
                raise typer.Exit(known[0]) from None
            if isinstance(exc, OSError):  # the file system refused something the checks could not foresee
                where = f": {exc.filename}" if exc.filename else ""
                info(f"error: {exc.strerror or exc}{where}")
                raise typer.Exit(1) from None
            if type(exc).__module__.startswith(("click", "typer")):  # Exit, Abort, usage errors: Typer handles them
                raise
            # a fault of dalle or a library that no check foresaw: one line, the traceback on request
            first = first_line(exc, "")
            info(f"error: unexpected {type(exc).__name__}{': ' + first if first else ''} (run again with "
                        "DALLE_DEBUG=1 for the traceback, and please report it)")
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            if debug_enabled():
                raise
            info(str(exc) if isinstance(exc, Interrupted) else "interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper
