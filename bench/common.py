"""Timing helpers shared by the benchmarks: interleaved A/B runs, medians, peak RSS of child processes."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """One line naming this machine: CPU model, cores, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    from bench.cpu import NOTABLE_FLAGS
    from dallecli.engine.device import cpu_flags

    found = cpu_flags()
    flags = (", ".join(f for f in NOTABLE_FLAGS if f in found) or "none of avx/avx2/avx512/amx") if found else \
        "unknown (no /proc/cpuinfo flags)"
    return (f"{cpu}, {os.cpu_count()} cores, flags: {flags}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def run_process(args: list[str], env: dict | None = None) -> float:
    """Wall time (s) of a child process, which must succeed."""
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, **(env or {})))
    return time.perf_counter() - started


def run_process_cpu(args: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall time and CPU time (user + system, s) of a child process, which must succeed. On a loaded machine
    the CPU time is the steadier of the two: time spent waiting for a core is not in it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = run_process(args, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def children_peak_rss_mb() -> float:
    """Peak resident memory (MiB) of the largest child process waited for so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def interleaved(a: Callable[[], float], b: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Run ``a`` and ``b`` alternately (A B A B ...) ``repeats`` times each; return their median results."""
    results_a, results_b = [], []
    for _ in range(repeats):
        results_a.append(a())
        results_b.append(b())
    return statistics.median(results_a), statistics.median(results_b)


def row(name: str, ours: float, baseline: float, unit: str = "s") -> str:
    """A Markdown table row: name, ours, baseline, ratio ours/baseline."""
    return f"| {name} | {ours:.3f} {unit} | {baseline:.3f} {unit} | {ours / baseline:.2f}x |"


PYTHON = sys.executable


def run_json_child(module: str, *args: str, python: str | None = None, env: dict | None = None) -> dict:
    """Run ``python -m module --child *args`` in a fresh process from the repository root and return the JSON
    object on the last line of its stdout (each benchmark arm runs this way, so no arm inherits another's
    allocations, threads or oneDNN caches).

    Raises:
        RuntimeError: the child failed; the message ends with the last 3,000 characters of its stderr.
    """
    done = subprocess.run([python or sys.executable, "-m", module, "--child", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{module} child {' '.join(args)[:200]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
