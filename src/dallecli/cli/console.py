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


class _SilentBar:
    """The stand-in for a progress bar when stderr is not a terminal: accepts every update, shows nothing."""

    shown = False

    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **changes) -> None:
        pass


class _RichBar:
    """A Rich ``Progress`` with one task, added on entering; ``advance`` and ``update`` act on that task."""

    shown = True

    def __init__(self, progress, **task):
        self.progress, self._new_task = progress, task

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task(**self._new_task)
        return self

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def update(self, **changes) -> None:
        self.progress.update(self.task, **changes)

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def progress_bar(total: int | None, description: str, *, unit: str = "steps", extra_columns: tuple[str, ...] = (),
                 fields: dict | None = None, elapsed: bool = True, completed: int = 0):
    """A transient Rich progress bar on stderr, or a silent stand-in when stderr is not a terminal.

    Columns: description, bar, count (``done/total`` for ``unit="steps"``; size and transfer speed for
    ``unit="bytes"``), ``extra_columns``, elapsed time (if ``elapsed``), time remaining.

    Args:
        total: units to count; ``None`` when unknown (the bar pulses).
        description: the text at the left of the bar.
        unit: ``"steps"`` or ``"bytes"``.
        extra_columns: Rich text templates over the task's fields, e.g. ``"loss {task.fields[loss]}"``.
        fields: first values of the fields that ``extra_columns`` read.
        elapsed: show the time elapsed.
        completed: units already done when the bar starts (a resumed run).

    Returns:
        A context manager whose value has ``advance(n=1)``, ``update(**changes)`` (Rich's task update:
        ``completed=``, ``advance=``, ``total=``, fields) and ``shown`` (False for the silent stand-in).
    """
    from contextlib import nullcontext

    if unit not in ("steps", "bytes"):
        raise ValueError(f"unit must be 'steps' or 'bytes', not {unit!r}")
    console = err()
    if not console.is_terminal:
        return nullcontext(_SilentBar())
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

    count = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    columns = [TextColumn("{task.description}"), BarColumn(), *count, *(TextColumn(c) for c in extra_columns),
               *([TimeElapsedColumn()] if elapsed else []), TimeRemainingColumn()]
    return _RichBar(Progress(*columns, console=console, transient=True), description=description, total=total,
                    completed=completed, **(fields or {}))


def report_memory_choice(choice) -> None:
    """Say on stderr when the engine turned low-memory mode on by itself."""
    if choice.automatic and choice.low_memory:
        info(f"low memory ({choice.reason}): using --low-memory ({', '.join(choice.techniques)}); "
             "pass --no-low-memory to turn it off")
