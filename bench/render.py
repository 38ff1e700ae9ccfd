"""BENCHMARKS.md from build/bench/results.json (written by ``python -m bench.suite``)."""

from __future__ import annotations

MiB = 1024**2


def _f(value, digits: int = 2, unit: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def _ratio(ours, base) -> str:
    return "–" if not ours or not base else f"{ours / base:.2f}×"


def _meta(section: dict) -> str:
    meta = section.get("_meta", {})
    line = f"*Measured {meta.get('when', '?')}, {meta.get('repeats', '?')} repeats, section took {meta.get('seconds', '?')} s.*\n"
    if meta.get("contended"):
        line += (f"\n**Contended run:** {meta['contended']} The timings of this section are upper bounds, not "
                 "results; the counts are exact.\n")
    return line


def startup(s: dict) -> list[str]:
    lines = ["## Start-up", "", _meta(s), "| command | dalle | `python -c pass` | ratio | target ≤ 0.3 s |", "|---|---|---|---|---|"]
    for name in ("dalle --help", "dalle generate --help"):
        row = s[name]
        ok = ("upper bound" if s.get("_meta", {}).get("contended") else "met" if row["ours_s"] <= 0.3 else "**not met**")
        lines.append(f"| `{name}` | {row['ours_s']:.3f} s | {row['python_s']:.3f} s | {_ratio(row['ours_s'], row['python_s'])} | {ok} |")
    lines += ["", f"Imports torch or diffusers for `--help`: **{'yes' if s['imports_torch'] else 'no'}**.", ""]
    return lines


def load(s: dict) -> list[str]:
    gb = s["file_bytes"] / 1e9
    lines = ["## Load: SD 1.5-size pipeline from safetensors", "", _meta(s),
             f"{s['params'] / 1e9:.2f} B parameters, {gb:.2f} GB of float16 safetensors. Time from the call to a "
             "pipeline ready on the CPU (imports not timed), each arm in a fresh process; cold = the files evicted "
             "from the page cache first (`posix_fadvise(DONTNEED)`). Ratio against plain diffusers in float32.", "",
             "| page cache | arm | dtype | seconds | ratio vs diffusers fp32 | vs reading the bytes | RSS after load | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for cache in ("warm", "cold"):
        arms = s.get(cache, {})
        base = arms.get("diffusers fp32", {}).get("seconds")
        read = arms.get("read", {}).get("seconds")
        for arm, r in arms.items():
            rate = f" ({gb / r['seconds']:.2f} GB/s)" if arm == "read" else ""
            lines.append(f"| {cache} | {arm} | {r['dtype'] or '–'} | {r['seconds']:.2f} s{rate} | {_ratio(r['seconds'], base)} | "
                         f"{_ratio(r['seconds'], read)} | {r['rss_mb'] / 1024:.2f} GiB | {r['peak_rss_mb'] / 1024:.2f} GiB |")
    return lines + [""]


def generate(s: dict, title: str) -> list[str]:
    arms = s["arms"]
    base = arms["diffusers fp32"]
    lines = [f"## {title}", "", _meta(s),
             f"{s['params'] / 1e9:.2f} B parameters, 512×512, {s['steps']} step(s), guidance {s['guidance']:g}, seed 1. "
             "Per image = the pipeline call after one warm-up call (same shapes), load not included. Breakdown from "
             "timers around the text encoder, each UNet call and the VAE decode (same on every arm). PSNR against the "
             "plain diffusers float32 image with the same seed.", "",
             "| arm | dtype | per image | ratio | text encoder | UNet per step | VAE decode | load | peak RSS | PSNR vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, r in arms.items():
        psnr = s["psnr_vs_diffusers_fp32"].get(arm)
        psnr_text = "(reference)" if arm == "diffusers fp32" else ("∞" if psnr == float("inf") else _f(psnr, 1, " dB"))
        lines.append(f"| {arm} | {r['dtype']} | {r['image_s']:.2f} s | {_ratio(r['image_s'], base['image_s'])} | "
                     f"{_f(r['text_encoder_s'], 2, ' s')} | {_f(r['unet_step_s'], 2, ' s')} | {_f(r['vae_decode_s'], 2, ' s')} | "
                     f"{_f(r['load_s'], 1, ' s')} | {r['peak_rss_mb'] / 1024:.2f} GiB | {psnr_text} |")
    for arm, error in s.get("errors", {}).items():
        lines.append(f"| {arm} | failed: {error} | | | | | | | | |")
    return lines + [""]


def peak_text(cpu: dict) -> str:
    """The sentence that derives the peak from the figures ``bench.cpu.peak`` recorded (older results too)."""
    from bench.cpu import CLOCK_SOURCES, NOTABLE_FLAGS

    lanes = cpu.get("fp32_lanes")
    simd = cpu.get("simd") or {16: "AVX-512", 8: "AVX2"}.get(lanes, "SSE2")
    source = cpu.get("clock_source") or ("model name" if cpu.get("clock_ghz") else None)  # older results: the name
    model = f"{cpu['model']}, " if cpu.get("model") else ""
    flags = cpu.get("flags")
    flags_text = ("flags: " + (", ".join(f for f in NOTABLE_FLAGS if f in flags) or "no AVX/FMA/AMX")
                  + "; ") if flags is not None else ""
    head = (f"Peak ({model}{flags_text}{cpu['cores']} physical cores): {cpu['cores']} cores × {cpu['fma_units']} "
            f"FMA units × {lanes} float32 lanes ({simd}) × 2 flops per FMA")
    if not cpu.get("peak_gflops") or not cpu.get("clock_ghz"):
        return (head + " × an unknown clock: no model-name clock, cpufreq, \"cpu MHz\" or measurement was available, "
                "so no peak and no share of it are given.")
    text = (f"{head} × {cpu['clock_ghz']:g} GHz ({CLOCK_SOURCES.get(source, source)}) = "
            f"**{cpu['peak_gflops']:.0f} GFLOP/s** float32.")
    others = {k: v for k, v in (cpu.get("clocks") or {}).items() if k != source}
    if others:
        text += " Other clock readings: " + ", ".join(f"{k} {v:g} GHz" for k, v in others.items()) + "."
    text += f" FMA units: {cpu.get('basis') or 'an assumption (two per core)'}. An upper bound: wide-vector code often runs below the nominal clock."
    if cpu.get("bf16_basis"):
        bf16 = cpu.get("bf16_peak_gflops")
        text += f" bfloat16: {cpu['bf16_basis']}" + (f" ({bf16:.0f} GFLOP/s)." if bf16 else ".")
    return text


def flops(s: dict, results: dict) -> list[str]:
    cpu = s["cpu"]
    peak = cpu.get("peak_gflops") or None  # None or 0 (older results): no share of peak, never a division by it
    lines = ["## Physical limit", "", _meta(s),
             peak_text(cpu) + " What one large matrix product reaches with every thread: "
             f"float32 {s['gemm_float32_gflops']:.0f} GFLOP/s, bfloat16 {s['gemm_bfloat16_gflops']:.0f} GFLOP/s.", "",
             "| UNet step | FLOPs (`torch.utils.flop_counter`) | arm | seconds per step | achieved | share of peak |",
             "|---|---|---|---|---|---|"]
    for name, label in (("sd15", "SD 1.5, 64×64 latents, batch 2 (guidance)"), ("sd_turbo", "SD 2.1 (SD-Turbo), 64×64 latents, batch 1")):
        flop = s[name]["flops"]
        measured = results["sections"].get("sd-turbo" if name == "sd_turbo" else "sd15", {}).get("arms", {})
        if not measured:
            lines.append(f"| {label} | {flop / 1e12:.2f} TFLOP | – | – | – | – |")
        for arm, r in measured.items():
            if r.get("unet_step_s") and "tiny" not in arm:
                achieved = flop / r["unet_step_s"] / 1e9
                lines.append(f"| {label} | {flop / 1e12:.2f} TFLOP | {arm} ({r['dtype']}) | {r['unet_step_s']:.2f} s | "
                             f"{achieved:.0f} GFLOP/s | {f'{achieved / peak:.0%}' if peak else '–'} |")
    vae, tiny = s.get("vae_decode", {}).get("flops"), s.get("taesd_decode", {}).get("flops")
    if vae and tiny:
        turbo = results["sections"].get("sd-turbo", {}).get("arms", {})
        full_s = turbo.get("dalle auto", {}).get("vae_decode_s")
        tiny_s = turbo.get("dalle auto --vae tiny", {}).get("vae_decode_s")
        dtype = turbo.get("dalle auto", {}).get("dtype")
        lines += ["", f"512×512 decode: SD VAE (`AutoencoderKL`) {vae / 1e12:.2f} TFLOP, TAESD (`AutoencoderTiny`) "
                      f"{tiny / 1e12:.3f} TFLOP ({vae / tiny:.0f}× fewer)"
                      + (f"; measured ({dtype}, `dalle auto` against `--vae tiny`) {full_s:.2f} s against {tiny_s:.2f} s "
                         f"({full_s / tiny_s:.0f}× faster)."
                         if full_s and tiny_s else ".")]
    return lines + [""]


def embedded(s: dict) -> list[str]:
    b = s["bf16"]
    lines = ["## Embedded model (`shapes`, 64×64, 12 steps): cold and warm", "", _meta(s),
             "| what | dallecli | baseline | ratio |", "|---|---|---|---|", *s["table"][2:], "",
             "### bfloat16 on the CPU: the quality rule and the size rule", "",
             f"Embedded model, warm per image, float32 {b['float32_s'] * 1000:.0f} ms, bfloat16 {b['bfloat16_s'] * 1000:.0f} ms "
             f"({b['bfloat16_s'] / b['float32_s']:.2f}×). PSNR of bfloat16 against float32 with the same seed over 8 "
             f"prompts/seeds: worst {b['psnr_db_min']:.1f} dB, median {b['psnr_db_median']:.1f} dB; NaN: {'yes' if b['nan'] else 'no'}. "
             f"Quality rule (≥ 30 dB, no NaN): **{'holds' if b['quality_holds'] else 'fails'}**. `--dtype auto` picks "
             f"**{b['auto_dtype']}** for this model on this CPU.", ""]
    return lines


def batch_ratio(line: str, header: str) -> float:
    """The ours ÷ bare-loop ratio of one row of batch_bench's table (found by its column's name)."""
    names = [cell.strip() for cell in header.strip("|").split("|")]
    column = next(i for i, name in enumerate(names) if name.startswith("ratio"))
    return float(line.strip("|").split("|")[column].split()[0].rstrip("x×"))


def batch(s: dict) -> list[str]:
    return ["## Batch: images/s against batch size (`bench.batch_bench`)", "", _meta(s), s.get("header", ""), "",
            *s["table"], ""]  # batch_bench's own header: its columns have changed before


def targets(results: dict) -> list[str]:
    sec = results["sections"]
    rows = []
    turbo = sec.get("sd-turbo")
    if turbo:
        arms = turbo["arms"]
        base = arms["diffusers fp32"]["image_s"]
        auto, tiny = arms["dalle auto"], arms.get("dalle auto --vae tiny")
        psnr = turbo["psnr_vs_diffusers_fp32"]["dalle auto"]
        ratio = auto["image_s"] / base
        rows.append(("SD-Turbo arch 512² per image ≤ 0.55× (bf16), PSNR ≥ 30 dB",
                     f"{ratio:.2f}×, PSNR {psnr:.1f} dB", ratio <= 0.55 and psnr >= 30))
        if tiny:
            rows.append(("with `--vae tiny` ≤ 0.2×", f"{tiny['image_s'] / base:.2f}×", tiny["image_s"] / base <= 0.2))
        width = {"float32": 4, "bfloat16": 2, "float16": 2}[auto["dtype"]]  # bytes per weight in the dtype used
        weights = turbo["params"] * width / 1024**2
        rows.append((f"peak RSS ≤ 1.2× weights in the dtype used (SD-Turbo, {auto['dtype']}, one image)",
                     f"{auto['peak_rss_mb'] / weights:.2f}× ({auto['peak_rss_mb'] / 1024:.2f} GiB for {weights / 1024:.2f} GiB "
                     f"of {auto['dtype']} weights; after load {auto['rss_after_load_mb'] / weights:.2f}×)",
                     auto["peak_rss_mb"] <= 1.2 * weights))
    if sec.get("startup"):
        worst = max(sec["startup"][k]["ours_s"] for k in ("dalle --help", "dalle generate --help"))
        rows.append(("start-up ≤ 0.3 s, no torch import", f"{worst:.3f} s, torch imported: {sec['startup']['imports_torch']}",
                     worst <= 0.3 and not sec["startup"]["imports_torch"]))
    if sec.get("batch"):
        ratios = [batch_ratio(line, sec["batch"]["table"][0]) for line in sec["batch"]["table"][2:]]
        rows.append(("batch throughput ≥ 0.95× bare loop", ", ".join(f"{r:.2f}×" for r in ratios), min(ratios) >= 0.95))
    if sec.get("startup", {}).get("_meta", {}).get("contended"):
        rows = [(n, v + " (contended run: upper bound)", None) if n.startswith("start-up") else (n, v, ok) for n, v, ok in rows]
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'not measured cleanly yet' if ok is None else 'yes' if ok else '**no**'} |"
              for name, value, ok in rows]
    measured = {"sd-turbo", "batch"} & set(sec)
    for name in ("SD-Turbo arch 512² per image ≤ 0.55× (bf16), PSNR ≥ 30 dB", "with `--vae tiny` ≤ 0.2×",
                 "peak RSS ≤ 1.2× weights in the dtype used"):
        if "sd-turbo" not in measured:
            lines.append(f"| {name} | – | not measured yet |")
    if "batch" not in measured:
        lines.append("| batch throughput ≥ 0.95× bare loop | – | not measured yet |")
    return lines + [""]


def render_markdown(results: dict) -> str:
    sec = results["sections"]
    commands = sorted({s.get("_meta", {}).get("command", "") for s in sec.values()})
    lines = ["# Benchmarks", "",
             "Written by `python -m bench.suite` (see its docstring); every ratio is dallecli ÷ plain diffusers doing the "
             "same work, measured side by side in the same run (arms alternate A B A B, each in its own process), median "
             "of the repeats. The SD 1.5 and SD-Turbo pipelines have the published architectures with random weights "
             "(`bench/models.py`), so speed and memory are real and the pictures are noise.", "",
             f"**Machine:** {results.get('machine', '?')}.  ",
             f"**Commands:** {', '.join(f'`{c.strip()}`' for c in commands if c)}", ""]
    lines += targets(results)
    if "startup" in sec:
        lines += startup(sec["startup"])
    if "load" in sec:
        lines += load(sec["load"])
    if "sd-turbo" in sec:
        lines += generate(sec["sd-turbo"], "Per image: SD-Turbo architecture (SD 2.1 UNet), 512², 1 step, guidance 0")
    if "sd15" in sec:
        lines += generate(sec["sd15"], f"Per image: SD 1.5, 512², {sec['sd15']['steps']} steps, guidance {sec['sd15']['guidance']:g}")
    if "flops" in sec:
        lines += flops(sec["flops"], results)
    if "embedded" in sec:
        lines += embedded(sec["embedded"])
    if "batch" in sec:
        lines += batch(sec["batch"])
    notes = results.get("notes")
    if notes:
        lines += ["## Notes", "", notes, ""]
    return "\n".join(lines)
