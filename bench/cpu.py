"""This CPU's float32 peak, estimated from what can be known about it on any x86 machine.

peak = physical cores × FMA units × float32 lanes × 2 flops per FMA × clock

The lanes come from the SIMD flags (avx512f: 16, avx/avx2: 8, else SSE2's 4, which every x86-64 CPU has); the FMA
units per core from the vendor and family where they are known, else an assumption the result names. The clock
is taken from the first of these that exists, and the result says which:

1. the nominal clock in the model name ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz"); many names have none
   ("Intel(R) Xeon(R) Processor", "AMD EPYC 7763 64-Core Processor", "AMD EPYC");
2. the highest clock the kernel's cpufreq driver allows (/sys/.../cpufreq/cpuinfo_max_freq; absent in most VMs);
3. "cpu MHz" in /proc/cpuinfo (under a hypervisor usually the host's nominal TSC clock);
4. a measured effective clock: a single-thread float32 matrix product that fits in cache, divided by the
   FMA width per cycle (a lower bound: no matrix product reaches every FMA slot, and other load slows it).

When none is known the peak is None: nothing divides by a missing clock.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

# the flags that decide float32/bfloat16 speed, as every benchmark's machine line names them (bench.common.machine)
NOTABLE_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")
CPUFREQ_MAX = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"
CLOCK_SOURCES = {
    "model name": "the nominal clock in the CPU's model name",
    "cpufreq max": "the highest clock cpufreq allows (cpuinfo_max_freq)",
    "cpu MHz": 'the "cpu MHz" line of /proc/cpuinfo',
    "measured": "an effective clock measured with a single-thread float32 matrix product (a lower bound)",
}


@dataclass(frozen=True)
class CpuDescription:
    """What /proc/cpuinfo (and cpufreq) say about the first CPU; every field may be missing."""

    model: str = ""
    vendor: str = ""  # vendor_id: "GenuineIntel", "AuthenticAMD"
    family: int | None = None  # "cpu family": AMD 25 = Zen 3/4, 26 = Zen 5
    flags: frozenset[str] = field(default_factory=frozenset)
    cores: int = 1  # physical cores this process may use
    cpu_mhz: float | None = None
    max_mhz: float | None = None


def parse_cpuinfo(text: str) -> dict:
    """model, vendor, family, flags and cpu_mhz of the first processor in a /proc/cpuinfo text."""
    found: dict = {}
    keys = {"model name": "model", "vendor_id": "vendor", "cpu family": "family", "flags": "flags", "cpu MHz": "cpu_mhz"}
    for line in text.splitlines():
        if not line.strip():
            if found:
                break  # the end of the first processor's block
            continue
        key, _, value = (part.strip() for part in line.partition(":"))
        name = keys.get(key)
        if name is None or name in found:
            continue
        if name == "flags":
            found[name] = frozenset(value.split())
        elif name in ("family", "cpu_mhz"):
            try:
                found[name] = int(value) if name == "family" else float(value)
            except ValueError:
                pass
        else:
            found[name] = value
    return found


def read_cpu(cpuinfo: str = "/proc/cpuinfo", cpufreq_max: str = CPUFREQ_MAX) -> CpuDescription:
    """This machine's :class:`CpuDescription` (fields it cannot read stay empty)."""
    from dallecli.engine.threads import physical_cores

    try:
        found = parse_cpuinfo(Path(cpuinfo).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        found = {}
    max_mhz = None
    try:
        max_mhz = int(Path(cpufreq_max).read_text().strip()) / 1000  # kHz
    except (OSError, ValueError):
        pass
    return CpuDescription(cores=physical_cores(cpuinfo), max_mhz=max_mhz or None, **found)


def nominal_ghz(model: str) -> float | None:
    """The clock written in a model name ("... @ 2.80GHz" -> 2.8), or None when the name has none."""
    match = re.search(r"(\d+(?:\.\d+)?)\s*GHz", model, re.IGNORECASE)
    if match:
        return float(match.group(1)) or None
    match = re.search(r"(\d{3,5})\s*MHz", model, re.IGNORECASE)
    return float(match.group(1)) / 1000 if match else None


def is_amd(cpu: CpuDescription) -> bool:
    return cpu.vendor == "AuthenticAMD" or cpu.model.upper().startswith("AMD") or " AMD " in f" {cpu.model.upper()} "


def simd(cpu: CpuDescription) -> dict:
    """FMA units per core, float32 lanes per unit, whether they fuse multiply and add, and why."""
    flags = cpu.flags
    if "avx512f" in flags:
        if is_amd(cpu) and (cpu.family or 0) >= 26:
            return {"fma_units": 2, "fp32_lanes": 16, "fma": True, "simd": "AVX-512",
                    "basis": "AMD family 26 (Zen 5): two 512-bit FMA pipes per core (the server and desktop parts; "
                             "some mobile Zen 5 parts run AVX-512 on 256-bit pipes)"}
        if is_amd(cpu):
            return {"fma_units": 2, "fp32_lanes": 8, "fma": True, "simd": "AVX-512 on 256-bit pipes",
                    "basis": f"AMD {'family ' + str(cpu.family) if cpu.family else 'CPU of unknown family'} with "
                             "AVX-512 taken as Zen 4: two 256-bit FMA pipes, a 512-bit instruction runs as two halves"}
        return {"fma_units": 2, "fp32_lanes": 16, "fma": True, "simd": "AVX-512",
                "basis": "an assumption: two 512-bit FMA ports per core, as Xeon Scalable Gold/Platinum have "
                         "(Silver/Bronze and some client cores have one; a VM does not say which SKU it runs on)"}
    if "avx2" in flags and "fma" in flags:
        return {"fma_units": 2, "fp32_lanes": 8, "fma": True, "simd": "AVX2+FMA",
                "basis": "two 256-bit FMA units per core (Intel since Haswell, AMD since Zen 2)"}
    if "avx" in flags:
        return {"fma_units": 1, "fp32_lanes": 8, "fma": False, "simd": "AVX without FMA",
                "basis": "no FMA: one 256-bit multiply and one 256-bit add per cycle, counted as one FMA"}
    return {"fma_units": 1, "fp32_lanes": 4, "fma": False, "simd": "SSE2",
            "basis": ("no AVX flags" if flags else "no CPU flags could be read") + ": SSE2, which every x86-64 CPU "
                     "has, one 128-bit multiply and one 128-bit add per cycle"}


def peak(cpu: CpuDescription, measured_ghz: float | None = None) -> dict:
    """The float32 (and bfloat16) peak in GFLOP/s, with every figure it rests on and where the clock came from.

    Args:
        cpu: what is known about the CPU (see :func:`read_cpu`).
        measured_ghz: an effective clock from :func:`measure_clock_ghz`, used only when no other source has one.

    Returns:
        A dict: cores, fma_units, fp32_lanes, simd, basis, clock_ghz and clock_source (None, None when no clock is
        known), clocks (every source that gave one, GHz), peak_gflops (None without a clock), bf16_peak_gflops and
        bf16_basis, model, vendor, family and flags (sorted) — so a results file says which CPU it describes.
    """
    unit = simd(cpu)
    clocks = {"model name": nominal_ghz(cpu.model),
              "cpufreq max": cpu.max_mhz / 1000 if cpu.max_mhz else None,
              "cpu MHz": cpu.cpu_mhz / 1000 if cpu.cpu_mhz else None,
              "measured": measured_ghz or None}
    clocks = {source: round(ghz, 3) for source, ghz in clocks.items() if ghz and ghz > 0}
    source = next(iter(clocks), None)
    clock = clocks.get(source) if source else None
    per_cycle = unit["fma_units"] * unit["fp32_lanes"] * 2  # flops per core per cycle
    fp32 = cpu.cores * per_cycle * clock if clock else None
    if cpu.flags & {"amx_bf16", "amx_tile"}:
        bf16, bf16_basis = None, "AMX tiles: not estimated (their rate is not an FMA count)"
    elif "avx512_bf16" in cpu.flags:
        bf16 = 2 * fp32 if fp32 else None
        bf16_basis = "AVX-512-BF16 dot products: two bfloat16 products per float32 lane, twice the float32 peak"
    else:
        bf16, bf16_basis = fp32, "no bfloat16 arithmetic: kernels convert to float32 and FMA there, the same peak"
    return {"model": cpu.model or "unknown", "vendor": cpu.vendor or None, "family": cpu.family,
            "flags": sorted(cpu.flags), "cores": cpu.cores, **unit, "flops_per_cycle_per_core": per_cycle,
            "clock_ghz": clock, "clock_source": source, "clocks": clocks,
            "peak_gflops": fp32, "bf16_peak_gflops": bf16, "bf16_basis": bf16_basis}


def measure_clock_ghz(cpu: CpuDescription, seconds: float = 0.5) -> float | None:
    """An effective clock (GHz): one thread's float32 matrix-product rate over its FMA flops per cycle.

    The 192×192 operands stay in L2, so the product is FMA-bound; it reaches 80-95 % of the FMA slots on an idle
    core, so this is a lower bound of the clock the FMA units run at (and lower still under other load).
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - the benchmarks need torch anyway
        return None
    unit = simd(cpu)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 192
        a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        for _ in range(20):
            torch.mm(a, b, out=out)
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:  # best of short bursts: least disturbed by other processes
            started = time.perf_counter()
            for _ in range(20):
                torch.mm(a, b, out=out)
            best = max(best, 20 * 2 * n**3 / (time.perf_counter() - started))
    finally:
        torch.set_num_threads(threads)
    return best / (unit["fma_units"] * unit["fp32_lanes"] * 2) / 1e9 or None
