"""The benchmarks' CPU peak estimate (bench/cpu.py) and its rendering, on CPUs with and without a clock."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder beside src/, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.cpu import CpuDescription, nominal_ghz, parse_cpuinfo, peak, read_cpu, simd  # noqa: E402
from bench.render import flops, peak_text  # noqa: E402

AVX512 = frozenset({"fpu", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"})
AVX2 = frozenset({"fpu", "avx", "avx2", "fma"})
CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: {family}
model name\t: {model}
cpu MHz\t\t: {mhz}
flags\t\t: {flags}
core id\t\t: 0

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: something else
cpu MHz\t\t: 1.0
flags\t\t: fpu
core id\t\t: 1
"""


@pytest.mark.parametrize(("model", "ghz"), [
    ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", 2.5),
    ("Intel(R) Xeon(R) Processor @ 2.80GHz", 2.8),
    ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", 3.2),
    ("Intel(R) Xeon(R) Processor", None),
    ("AMD EPYC 7763 64-Core Processor", None),
    ("AMD EPYC", None),
    ("", None),
])
def test_nominal_clock_only_when_the_name_has_one(model, ghz):
    assert nominal_ghz(model) == ghz


def test_cpuinfo_is_read_from_the_first_processor(tmp_path):
    text = CPUINFO.format(vendor="AuthenticAMD", family=26, model="AMD EPYC", mhz="2596.122", flags=" ".join(AVX512))
    assert parse_cpuinfo(text) == {"vendor": "AuthenticAMD", "family": 26, "model": "AMD EPYC", "cpu_mhz": 2596.122,
                                   "flags": AVX512}
    (tmp_path / "cpuinfo").write_text(text)
    cpu = read_cpu(str(tmp_path / "cpuinfo"), str(tmp_path / "no-cpufreq"))
    assert (cpu.model, cpu.family, cpu.cpu_mhz, cpu.max_mhz) == ("AMD EPYC", 26, 2596.122, None)
    (tmp_path / "max_freq").write_text("3700000\n")  # kHz
    assert read_cpu(str(tmp_path / "cpuinfo"), str(tmp_path / "max_freq")).max_mhz == 3700.0
    missing = read_cpu(str(tmp_path / "missing"), str(tmp_path / "missing"))
    assert (missing.model, missing.flags, missing.cpu_mhz) == ("", frozenset(), None)


def test_intel_name_without_clock_uses_cpu_mhz():
    """The crash of issue #17: "Intel(R) Xeon(R) Processor" has no "@ x GHz"."""
    cpu = CpuDescription(model="Intel(R) Xeon(R) Processor", vendor="GenuineIntel", family=6, flags=AVX512, cores=2,
                         cpu_mhz=2800.0)
    result = peak(cpu, measured_ghz=2.1)
    assert (result["clock_ghz"], result["clock_source"]) == (2.8, "cpu MHz")
    assert result["clocks"] == {"cpu MHz": 2.8, "measured": 2.1}
    assert result["peak_gflops"] == pytest.approx(2 * 2 * 16 * 2 * 2.8)  # 358.4
    assert result["model"] == "Intel(R) Xeon(R) Processor" and "avx512f" in result["flags"]


def test_nominal_clock_wins_over_the_others():
    cpu = CpuDescription(model="Intel(R) Xeon(R) Processor @ 2.80GHz", flags=AVX512, cores=2, cpu_mhz=2793.4,
                         max_mhz=3500.0)
    result = peak(cpu, measured_ghz=2.3)
    assert (result["clock_ghz"], result["clock_source"]) == (2.8, "model name")
    assert result["peak_gflops"] == pytest.approx(358.4)
    assert set(result["clocks"]) == {"model name", "cpufreq max", "cpu MHz", "measured"}


def test_cpufreq_max_before_cpu_mhz():
    cpu = CpuDescription(model="AMD EPYC 7763 64-Core Processor", vendor="AuthenticAMD", family=25, flags=AVX2,
                         cores=4, cpu_mhz=1500.0, max_mhz=3500.0)
    result = peak(cpu)
    assert (result["clock_ghz"], result["clock_source"]) == (3.5, "cpufreq max")
    assert result["peak_gflops"] == pytest.approx(4 * 2 * 8 * 2 * 3.5)  # Zen 3: AVX2, two 256-bit FMA pipes


def test_measured_clock_when_nothing_else_exists():
    cpu = CpuDescription(model="AMD EPYC", vendor="AuthenticAMD", family=26, flags=AVX512 | {"avx512_bf16"}, cores=2)
    result = peak(cpu, measured_ghz=2.4)
    assert (result["clock_ghz"], result["clock_source"]) == (2.4, "measured")
    assert result["peak_gflops"] == pytest.approx(2 * 2 * 16 * 2 * 2.4)  # Zen 5: two 512-bit FMA pipes
    assert result["bf16_peak_gflops"] == pytest.approx(2 * result["peak_gflops"])


@pytest.mark.parametrize("measured", [None, 0.0])
def test_no_clock_at_all_gives_no_peak_and_no_division(measured):
    cpu = CpuDescription(model="Intel(R) Xeon(R) Processor", flags=AVX512, cores=2)
    result = peak(cpu, measured_ghz=measured)
    assert result["clock_ghz"] is None and result["clock_source"] is None and result["peak_gflops"] is None
    assert result["bf16_peak_gflops"] is None
    text = peak_text(result)
    assert "unknown clock" in text and "GFLOP/s" not in text


@pytest.mark.parametrize(("cpu", "units", "lanes"), [
    (CpuDescription(model="Intel(R) Xeon(R) Processor", vendor="GenuineIntel", flags=AVX512), 2, 16),
    (CpuDescription(model="AMD EPYC", vendor="AuthenticAMD", family=26, flags=AVX512), 2, 16),    # Zen 5
    (CpuDescription(model="AMD EPYC 9654", vendor="AuthenticAMD", family=25, flags=AVX512), 2, 8),  # Zen 4
    (CpuDescription(model="AMD EPYC", flags=AVX512), 2, 8),  # AMD by name, family unknown: taken as Zen 4
    (CpuDescription(model="Intel(R) Core(TM) i7-4770", flags=AVX2), 2, 8),
    (CpuDescription(model="Intel(R) Xeon(R) CPU E5-2670", flags=frozenset({"avx", "sse2"})), 1, 8),
    (CpuDescription(model="QEMU Virtual CPU", flags=frozenset({"sse2"})), 1, 4),
    (CpuDescription(), 1, 4),  # no flags at all: SSE2, which every x86-64 CPU has
])
def test_simd_width_from_flags(cpu, units, lanes):
    unit = simd(cpu)
    assert (unit["fma_units"], unit["fp32_lanes"]) == (units, lanes)
    assert unit["basis"]


def test_missing_flags_still_give_a_peak_with_a_clock():
    result = peak(CpuDescription(model="Intel(R) Xeon(R) Processor", cores=2, cpu_mhz=2000.0))
    assert result["simd"] == "SSE2" and "no CPU flags" in result["basis"]
    assert result["peak_gflops"] == pytest.approx(2 * 1 * 4 * 2 * 2.0)
    assert result["flags"] == []


def test_bf16_peak_follows_the_flags():
    base = dict(model="Intel(R) Xeon(R) Processor @ 2.00GHz", cores=1)
    # 1 core × 2 FMA units × 16 lanes × 2 flops × 2 GHz = 128 GFLOP/s float32
    assert peak(CpuDescription(flags=AVX512, **base))["bf16_peak_gflops"] == pytest.approx(128.0)  # converted: same
    assert peak(CpuDescription(flags=AVX512 | {"avx512_bf16"}, **base))["bf16_peak_gflops"] == pytest.approx(256.0)
    amx = peak(CpuDescription(flags=AVX512 | {"amx_bf16", "amx_tile"}, **base))
    assert amx["bf16_peak_gflops"] is None and "AMX" in amx["bf16_basis"]


def _flops_section(cpu: dict) -> dict:
    return {"cpu": cpu, "gemm_float32_gflops": 200.0, "gemm_bfloat16_gflops": 60.0,
            "sd15": {"flops": 1.6e12}, "sd_turbo": {"flops": 0.8e12}}


def test_render_without_clock_does_not_divide():
    """The ZeroDivisionError of issue #17: BENCHMARKS.md is rendered with '–' for the share of peak."""
    cpu = peak(CpuDescription(model="Intel(R) Xeon(R) Processor", flags=AVX512, cores=2))
    results = {"sections": {"sd15": {"arms": {"diffusers fp32": {"unet_step_s": 10.0, "dtype": "float32"}}}}}
    lines = flops(_flops_section(cpu), results)
    row = next(line for line in lines if "diffusers fp32" in line)
    assert row.endswith("| 160 GFLOP/s | – |")


def test_render_with_clock_names_its_source():
    cpu = peak(CpuDescription(model="AMD EPYC", vendor="AuthenticAMD", family=26, flags=AVX512, cores=2,
                              cpu_mhz=2596.122), measured_ghz=2.2)
    results = {"sections": {"sd15": {"arms": {"dalle auto": {"unet_step_s": 10.0, "dtype": "float32"}}}}}
    lines = flops(_flops_section(cpu), results)
    text = "\n".join(lines)
    assert '"cpu MHz" line of /proc/cpuinfo' in text and "measured 2.2 GHz" in text
    assert "AMD EPYC" in text and "avx512f" in text
    assert f"**{cpu['peak_gflops']:.0f} GFLOP/s**" in text  # 2 × 2 × 16 × 2 × 2.596 = 332
    assert next(line for line in lines if "dalle auto" in line).endswith(f"| {160 / cpu['peak_gflops']:.0%} |")


def test_render_reads_older_results_with_a_zero_peak():
    """results.json written before bench/cpu.py: no clock source, and a peak of 0 where the name had no clock."""
    old = {"cores": 2, "fma_units": 2, "fp32_lanes": 16, "clock_ghz": None, "peak_gflops": 0}
    results = {"sections": {"sd15": {"arms": {"dalle auto": {"unet_step_s": 10.0, "dtype": "float32"}}}}}
    assert next(line for line in flops(_flops_section(old), results) if "dalle auto" in line).endswith("| – |")
    older = {"cores": 2, "fma_units": 2, "fp32_lanes": 16, "clock_ghz": 2.8, "peak_gflops": 358.4}
    assert "the nominal clock in the CPU's model name" in peak_text(older)


def test_machine_line_names_cpu_model_and_flags():
    from bench.common import machine

    line = machine()
    assert "flags:" in line and "cores" in line and "torch" in line
