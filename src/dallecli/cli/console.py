"""Output streams: stdout for data only, stderr (Rich) for progress, warnings and errors."""

from __future__ import annotations

import json
import re
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def err():
    """The stderr Rich console."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


# Control characters (C0 but newline and tab, DEL, C1) and bidirectional overrides: text read from files and
# prompts (an image's metadata, a prompt file) must not recolour the terminal, set its title or reorder a line.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``, ``\\u202e``) so that printing it cannot
    drive the terminal; newlines and tabs are kept."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def warn(message: str) -> None:
    """One warning line on stderr (control characters escaped)."""
    from rich.text import Text

    err().print(Text("warning: ", style="yellow") + Text(printable(message)))


def info(message: str) -> None:
    """One informational line on stderr (control characters escaped)."""
    err().print(printable(message), markup=False)


def out(line: str) -> None:
    """One line of data on stdout (control characters escaped)."""
    sys.stdout.write(printable(line) + "\n")
    sys.stdout.flush()


def out_json(document) -> None:
    """A JSON document on stdout: exact (it decodes to ``document``), with C1 controls and bidi overrides written
    as ``\\uXXXX`` escapes, which ``ensure_ascii=False`` would leave raw (JSON already escapes C0)."""
    text = json.dumps(document, ensure_ascii=False, indent=2)
    sys.stdout.write(_UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")
    sys.stdout.flush()


def step_progress(total: int, description: str):
    """A Rich progress bar on stderr counting ``total`` units, or a no-op when stderr is not a terminal.

    Returns:
        A context manager whose value has ``advance(n=1)``.
    """
    from contextlib import nullcontext

    console = err()
    if not console.is_terminal:
        class _Silent:
            def advance(self, n: int = 1) -> None:
                pass

        return nullcontext(_Silent())
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    class _Bar:
        def __enter__(self):
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task(description, total=total)
            return self

        def advance(self, n: int = 1) -> None:
            self.progress.advance(self.task, n)

        def __exit__(self, *exc):
            return self.progress.__exit__(*exc)

    return _Bar()


def report_memory_choice(choice) -> None:
    """Say on stderr when the engine turned low-memory mode on by itself."""
    if choice.automatic and choice.low_memory:
        info(f"low memory ({choice.reason}): using --low-memory ({', '.join(choice.techniques)}); "
             "pass --no-low-memory to turn it off")
