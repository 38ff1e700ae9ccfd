"""The log of a build command (``build_default``, ``build_scorer``, ``build_emoji``): each line time-stamped,
shown on the console and appended to ``<work>/log.txt``, which survives interruptions and resumes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO


def work_log(work: Path, stream: TextIO | None = None) -> Callable[[str], None]:
    """A ``say(message)`` that prints ``HH:MM:SS message`` to ``stream`` (default stdout) and appends it to
    ``work/log.txt`` (``work`` is created), flushed at once so that a killed build keeps every line."""
    Path(work).mkdir(parents=True, exist_ok=True)
    log = (Path(work) / "log.txt").open("a", encoding="utf-8")

    def say(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, file=stream or sys.stdout, flush=True)
        log.write(line + "\n")
        log.flush()

    return say
