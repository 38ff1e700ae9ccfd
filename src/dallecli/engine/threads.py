"""CPU thread policy: one compute thread per physical core, shared out among the processes on the machine.

Hyper-threads share a core's vector units, so a second thread per core adds contention, not FLOPs; and N
processes each using every core (``dalle batch --shard I/N`` run N times on one machine) oversubscribe the
CPU N-fold. :func:`threads_per_process` is the pure policy; :func:`configure_threads` applies it once per
process (the batch code calls it with the number of local shards; the engine calls it with the default).
An explicit ``OMP_NUM_THREADS`` or ``DALLE_THREADS`` always wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_APPLIED: ThreadChoice | None = None


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


def choose_threads(physical: int, processes: int, env: dict | None = None) -> ThreadChoice:
    """The thread count to use (pure): ``DALLE_THREADS``, then ``OMP_NUM_THREADS``, then the core share."""
    env = os.environ if env is None else env
    for name in ("DALLE_THREADS", "OMP_NUM_THREADS"):
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return ThreadChoice(int(value), f"{name}={value}")
    threads = threads_per_process(physical, processes)
    share = f", shared by {processes} local processes" if processes > 1 else ""
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

    choice = choose_threads(physical_cores(), processes or local_process_count())
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    _APPLIED = choice
    return choice
