"""CPU thread policy: one compute thread per physical core that other processes leave free.

Hyper-threads share a core's vector units, so a second thread per core adds contention, not FLOPs. And a
thread that the scheduler takes away stalls all the others at the next OpenMP barrier: on a 2-core machine
with one busy process beside it, two threads made a 64x64 image 4-40x slower than one (BENCHMARKS.md,
threads). So the cores other processes keep busy are measured (:func:`busy_elsewhere`, from /proc/stat over
the seconds of start-up before the model loads, which :func:`mark_start` opens) and left to them; processes
of one job started together (``dalle batch --shard`` run N times, torchrun) measure one another the same way,
and torchrun's ``LOCAL_WORLD_SIZE`` splits the cores too. :func:`choose_threads` is the pure policy;
:func:`configure_threads` applies it once per process. An explicit ``DALLE_THREADS`` or ``OMP_NUM_THREADS``
always wins.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


_APPLIED: ThreadChoice | None = None
_START: CpuSnapshot | None = None
MIN_WINDOW_S = 0.3  # a shorter window is sampled for this long instead (a library user calling in directly)


@dataclass(frozen=True)
class CpuSnapshot:
    """Wall clock (s), CPU-seconds busy on the whole machine (all CPUs), and CPU-seconds of this process."""

    wall: float
    machine_busy: float
    own: float


def cpu_snapshot(stat: str = "/proc/stat") -> CpuSnapshot | None:
    """Read the machine's busy CPU time (user+nice+system+irq+softirq+steal of /proc/stat's ``cpu`` line) and
    this process's; None where /proc/stat does not exist (not Linux)."""
    try:
        with open(stat, encoding="ascii") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    ticks = [int(v) for v in fields[1:]]
    busy = ticks[0] + ticks[1] + ticks[2] + sum(ticks[5:8])  # user nice system (idle iowait) irq softirq steal
    own = os.times()
    return CpuSnapshot(time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system)


def mark_start() -> None:
    """Open the measuring window at process start (the CLI calls it before importing torch)."""
    global _START
    _START = cpu_snapshot()


def busy_elsewhere(start: CpuSnapshot | None, end: CpuSnapshot | None) -> float | None:
    """Cores other processes kept busy between two snapshots, on average (0 when idle; None if unknown)."""
    if start is None or end is None or end.wall - start.wall <= 0:
        return None
    others = (end.machine_busy - start.machine_busy) - (end.own - start.own)
    return max(0.0, others / (end.wall - start.wall))


@dataclass(frozen=True)
class ThreadChoice:
    """Intra-op threads for this process and why (for ``dalle doctor`` and the benchmarks)."""

    threads: int
    reason: str


def physical_cores(cpuinfo: str = "/proc/cpuinfo", allowed: set[int] | None = None) -> int:
    """Physical cores this process may run on: distinct (package, core) pairs among the allowed CPUs.

    Falls back to the allowed logical CPUs when ``cpuinfo`` cannot be read or lacks core ids (not Linux, some VMs).
    """
    if allowed is None:
        try:
            allowed = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
            allowed = set(range(os.cpu_count() or 1))
    cores, processor, package = set(), None, "0"
    try:
        with open(cpuinfo, encoding="utf-8") as handle:
            for line in handle:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "processor":
                    processor = int(value)
                elif key == "physical id":
                    package = value
                elif key == "core id" and processor in allowed:
                    cores.add((package, value))
    except (OSError, ValueError):
        cores = set()
    return len(cores) if cores else max(1, len(allowed))


def threads_per_process(physical: int, processes: int = 1) -> int:
    """Threads for one of ``processes`` processes sharing ``physical`` cores: an equal share, at least 1."""
    return max(1, physical // max(1, processes))


def local_process_count(env: dict | None = None) -> int:
    """Processes of this job on this machine: ``LOCAL_WORLD_SIZE`` (torchrun, accelerate), else 1."""
    value = (os.environ if env is None else env).get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def choose_threads(physical: int, processes: int, env: dict | None = None, *, busy: float | None = None,
                   logical: int | None = None) -> ThreadChoice:
    """The thread count to use (pure): ``DALLE_THREADS``, then ``OMP_NUM_THREADS``, then the share of the
    physical cores that the ``processes`` of this job on the machine have, less what other processes use.

    Args:
        physical: physical cores this process may run on.
        processes: processes of this job on this machine (``LOCAL_WORLD_SIZE``).
        env: the environment (default ``os.environ``).
        busy: cores other processes kept busy lately (:func:`busy_elsewhere`); None: not measured.
        logical: logical CPUs this process may run on (default ``physical``): ``busy`` is in logical CPUs.

    Raises:
        UsageError: ``DALLE_THREADS`` is set but not a whole number >= 1 (``OMP_NUM_THREADS``, which other
            libraries read too and may hold a list, is only used when it is one).
    """
    from dallecli.config import parse_threads

    env = os.environ if env is None else env
    parse_threads(env.get("DALLE_THREADS"))  # a bad DALLE_THREADS is an error, not a silent fallback
    for name in ("DALLE_THREADS", "OMP_NUM_THREADS"):
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return ThreadChoice(int(value), f"{name}={value}")
    threads = threads_per_process(physical, processes)
    share = f", shared by {processes} local processes" if processes > 1 else ""
    if busy is not None and busy >= 0.5:
        logical = logical or physical
        free = physical * max(0.0, 1 - busy / logical)  # the physical cores other processes leave free
        fewer = max(1, min(threads, round(free)))
        if fewer < threads:
            # a thread that waits for a core another process holds stalls the others at every barrier
            return ThreadChoice(fewer, f"{physical} physical core(s){share}, {busy:.1f} kept busy by other processes")
    return ThreadChoice(threads, f"{physical} physical core(s){share}")


def configure_threads(processes: int | None = None, *, force: bool = False) -> ThreadChoice:
    """Set torch's intra-op threads for this process, once (later calls return the first choice).

    Args:
        processes: processes sharing this machine's cores (local batch shards); default
            :func:`local_process_count`.
        force: apply again even if already configured (the batch code, when it learns the shard count late).

    Returns:
        The :class:`ThreadChoice` applied.
    """
    global _APPLIED
    if _APPLIED is not None and not force:
        return _APPLIED
    import torch

    start = _START
    if start is None or time.monotonic() - start.wall < MIN_WINDOW_S:  # no start-up window to read: sample one
        start = start or cpu_snapshot()
        if start is not None:
            time.sleep(max(0.0, MIN_WINDOW_S - (time.monotonic() - start.wall)))
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        logical = os.cpu_count() or 1
    choice = choose_threads(physical_cores(), processes or local_process_count(),
                            busy=busy_elsewhere(start, cpu_snapshot()), logical=logical)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    _APPLIED = choice
    return choice
