"""Timing helpers shared by the benchmarks: interleaved A/B runs, medians, peak RSS of child processes."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


def machine() -> str:
    """One line naming this machine: CPU model, cores, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    from dallecli.engine.device import cpu_flags

    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")
    flags = ", ".join(f for f in wanted if f in cpu_flags()) or "none of avx2/avx512/amx"
    return (f"{cpu}, {os.cpu_count()} cores, flags: {flags}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def run_process(args: list[str], env: dict | None = None) -> float:
    """Wall time (s) of a child process, which must succeed."""
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, **(env or {})))
    return time.perf_counter() - started


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
