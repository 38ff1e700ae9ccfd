"""Output streams: stdout for data only, stderr (Rich) for progress, warnings and errors.

Progress has four modes (``--progress``, ``DALLE_PROGRESS``, the config file's ``progress``): ``bar`` redraws a
Rich bar in place; ``plain`` writes whole lines that read well in a log file (one when the model starts
loading, then one per tenth of the job: at most 11, never a ``\r``); ``none`` shows nothing; ``auto`` (the
default) is ``bar`` when stderr is a terminal and ``plain`` otherwise.
"""

from __future__ import annotations

import json
import re
import sys
import time
from contextlib import contextmanager
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


def progress_mode(flag: str | None = None) -> str:
    """The progress display to use: ``flag`` (``--progress``), else ``DALLE_PROGRESS``, else the config file's
    ``progress``, else ``auto``; ``auto`` becomes ``bar`` when stderr is a terminal and ``plain`` otherwise.

    Returns:
        ``"bar"``, ``"plain"`` or ``"none"``.

    Raises:
        UsageError: a value that is not a mode; the message names where it came from.
    """
    from dallecli.config import check_progress_mode, setting_source, user_default

    if flag is not None:
        mode = check_progress_mode(flag, "--progress")
    else:
        mode = user_default("progress") or "auto"
        check_progress_mode(mode, setting_source("progress") or "--progress")
    if mode == "auto":
        return "bar" if err().is_terminal else "plain"
    return mode


class _SilentBar:
    """The progress bar of ``--progress none``: accepts every update, shows nothing."""

    shown = False
    mode = "none"

    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **changes) -> None:
        pass

    @contextmanager
    def loading(self, what: str = "model"):
        yield


class _PlainBar:
    """The progress bar of ``--progress plain``: a whole line when loading starts and one each time the job
    passes another tenth (``generating  30%  12/40 steps  5s elapsed, about 11s left``); never a ``\r``."""

    shown = False
    mode = "plain"

    def __init__(self, console, total: int | None, description: str, unit: str, completed: int):
        self.console, self.total, self.description, self.unit = console, total, description, unit
        self.completed = self.first = completed
        self.reported = self._tenths()
        self.started = time.perf_counter()

    def _tenths(self) -> int:
        return min(10, self.completed * 10 // self.total) if self.total else 0

    def _amount(self, value: float) -> str:
        return f"{value / 1e6:.1f}" if self.unit == "bytes" else f"{value:g}"

    def advance(self, n: int = 1) -> None:
        self.update(advance=n)

    def update(self, **changes) -> None:
        self.total = changes.get("total", self.total)
        self.description = changes.get("description", self.description)
        self.completed = changes.get("completed", self.completed) + changes.get("advance", 0)
        tenths = self._tenths()
        if tenths <= self.reported:
            return
        self.reported = tenths
        elapsed = time.perf_counter() - self.started
        done = self.completed - self.first
        left = f", about {elapsed / done * (self.total - self.completed):.0f}s left" if 0 < done and tenths < 10 else ""
        unit = "MB" if self.unit == "bytes" else self.unit
        self.console.print(f"{self.description}  {tenths * 10:3d}%  {self._amount(self.completed)}/"
                           f"{self._amount(self.total)} {unit}  {elapsed:.0f}s elapsed{left}", markup=False)

    @contextmanager
    def loading(self, what: str = "model"):
        self.console.print(f"loading {what}", markup=False)
        yield
        self.started = time.perf_counter()  # the rate and time left count generation only


class _RichBar:
    """A Rich ``Progress`` with one task, added on entering; ``advance`` and ``update`` act on that task."""

    shown = True
    mode = "bar"

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

    @contextmanager
    def loading(self, what: str = "model"):
        """Say "loading WHAT" with a pulsing bar while the block runs, then restart the bar where it was (its
        clock too, so that the time left counts generation only)."""
        task = self.progress.tasks[0]
        description, total, completed = task.description, task.total, task.completed
        task.total = None  # a pulse, not "0/24" (Rich's update() cannot set the total back to unknown)
        self.progress.update(self.task, description=f"loading {what}")
        yield
        self.progress.reset(self.task, description=description, total=total, completed=completed)

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def progress_bar(total: int | None, description: str, *, unit: str = "steps", extra_columns: tuple[str, ...] = (),
                 fields: dict | None = None, elapsed: bool = True, completed: int = 0, mode: str | None = None):
    """A progress display on stderr in the mode :func:`progress_mode` gives: a transient Rich bar (``bar``),
    a line per tenth of the job (``plain``) or nothing (``none``).

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
        mode: ``"bar"``, ``"plain"``, ``"none"`` or ``"auto"``; None: :func:`progress_mode`'s choice (the
            user's ``DALLE_PROGRESS`` or config file, else auto).

    Returns:
        A context manager whose value has ``advance(n=1)``, ``update(**changes)`` (Rich's task update:
        ``completed=``, ``advance=``, ``total=``, fields), ``loading(what="model")`` (a context manager: the
        bar says "loading model" while its block runs; plain mode writes that line once), ``shown`` (True
        for the Rich bar only) and ``mode``.

    Raises:
        UsageError: an unknown ``mode`` (see :func:`progress_mode`).
    """
    from contextlib import nullcontext

    if unit not in ("steps", "bytes"):
        raise ValueError(f"unit must be 'steps' or 'bytes', not {unit!r}")
    mode = progress_mode(mode)
    console = err()
    if mode == "none":
        return nullcontext(_SilentBar())
    if mode == "plain":
        return nullcontext(_PlainBar(console, total, description, unit, completed))
    if not console.is_terminal:  # --progress bar asked for off a terminal (a CI log that renders redraws)
        from rich.console import Console

        console = Console(stderr=True, highlight=False, soft_wrap=True, force_terminal=True)
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

    count = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    columns = [TextColumn("{task.description}"), BarColumn(), *count, *(TextColumn(c) for c in extra_columns),
               *([TimeElapsedColumn()] if elapsed else []), TimeRemainingColumn()]
    return _RichBar(Progress(*columns, console=console, transient=True), description=description, total=total,
                    completed=completed, **(fields or {}))


@contextmanager
def loading(what: str = "model", mode: str | None = None):
    """Show that ``what`` is loading while the block runs, where no progress bar is open yet: a pulsing
    "loading model" bar (``bar``), one line (``plain``) or nothing (``none``)."""
    with progress_bar(None, f"loading {what}", mode=mode) as bar, bar.loading(what):
        yield


def report_memory_choice(choice) -> None:
    """Say on stderr when the engine turned low-memory mode on by itself."""
    if choice.automatic and choice.low_memory:
        info(f"low memory ({choice.reason}): using --low-memory ({', '.join(choice.techniques)}); "
             "pass --no-low-memory to turn it off")
