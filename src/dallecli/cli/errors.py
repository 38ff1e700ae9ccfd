"""The one place where errors become a one-line message on stderr and an exit code.

Exit codes: 1 runtime error (file-system errors and unforeseen faults included: one line, never a traceback),
2 usage error, 3 out of memory, 130 interrupted (Ctrl-C).
``DALLE_DEBUG=1`` re-raises so the traceback shows.
"""

from __future__ import annotations

import functools

import typer

from dallecli.config import debug_enabled
from dallecli.errors import DalleError, first_line

EXIT_INTERRUPTED = 130


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


def handles_errors(command):
    """Decorate a Typer command so that DalleError and Ctrl-C end it with a message and exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from dallecli.cli.console import info

        try:
            return command(*args, **kwargs)
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
