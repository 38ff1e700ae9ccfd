"""Every benchmark of issue #7 in one command; writes BENCHMARKS.md.

    python -m bench.suite                              # everything (~20 min on 2 cores)
    python -m bench.suite --only startup,load,sd-turbo # some sections; the others stay as they were in the file
    python -m bench.suite --repeats 3

Each figure is a ratio against plain diffusers doing the same work in the same run: arms alternate (A B A B),
each arm in its own child process (so its peak RSS is its own), and the median over ``--repeats`` is kept.
The SD 1.5 and SD-Turbo pipelines have the published architectures with random weights (``bench.models``,
built once under build/bench-models/). Raw results go to build/bench/results.json; BENCHMARKS.md is
rendered from them, so sections measured at different times can be combined.

Sections: startup, load, sd-turbo, sd15, flops, embedded (cold/warm/bf16), batch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import run_json_child

ROOT = Path(__file__).resolve().parents[1]
OTHER_HEADING = "## Other benchmarks"  # BENCHMARKS.md from here on is kept as it is when the suite rewrites it
RESULTS = ROOT / "build" / "bench" / "results.json"
PROMPT = "a photo of an astronaut riding a horse on mars"
SECTIONS = ("startup", "load", "sd-turbo", "sd15", "flops", "embedded", "batch")
SD15_STEPS, SD15_GUIDANCE = 3, 7.5


# -- child processes: one arm each ----------------------------------------------------------------------------
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) / 1024


def _instrument(pipe) -> dict:
    """Wall time spent in the text encoder, each UNet call and the VAE decode (same hooks on every arm)."""
    timings = {"text_encoder": [], "unet": [], "vae_decode": []}

    def wrap(module, name, method="forward"):
        original = getattr(module, method)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            result = original(*args, **kwargs)
            timings[name].append(time.perf_counter() - started)
            return result

        setattr(module, method, timed)

    wrap(pipe.text_encoder, "text_encoder")
    wrap(pipe.unet, "unet")
    wrap(pipe.vae, "vae_decode", "decode")
    return timings


def child_generate(spec: dict) -> dict:
    """Load a pipeline (ours through Engine, or plain diffusers) and time images; ``spec`` says which."""
    import numpy as np
    import torch

    from dallecli.engine.loading import quiet_libraries

    quiet_libraries()
    arm, folder = spec["arm"], spec["model"]
    steps, guidance, size, seed = spec["steps"], spec["guidance"], spec["size"], 1
    started = time.perf_counter()
    if arm.startswith("dalle"):
        from dallecli.engine.generate import Engine
        from dallecli.engine.request import GenerationRequest

        engine = Engine(folder, "cpu", spec.get("dtype"), vae=spec.get("vae"), low_memory=spec.get("low_memory"))
        pipe = engine.pipe
        request = GenerationRequest(PROMPT, seed=seed, steps=steps, guidance_scale=guidance, width=size, height=size)

        def one(n_steps):
            from dataclasses import replace

            result = next(engine.generate(replace(request, steps=n_steps)))
            return np.asarray(result.image)
        dtype = engine.dtype
    else:
        from diffusers import DiffusionPipeline

        dtype = spec.get("dtype") or "float32"
        pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, torch_dtype=getattr(torch, dtype))
        pipe.set_progress_bar_config(disable=True)

        def one(n_steps):
            image = pipe(PROMPT, num_inference_steps=n_steps, guidance_scale=guidance, height=size, width=size,
                         generator=torch.Generator().manual_seed(seed)).images[0]
            return np.asarray(image)
    load_seconds = time.perf_counter() - started
    rss_after_load = _current_rss_mb()
    timings = _instrument(pipe)
    one(spec.get("warmup_steps", 1))  # warm-up: same shapes, oneDNN primitives created
    for values in timings.values():
        values.clear()
    started = time.perf_counter()
    image = one(steps)
    seconds = time.perf_counter() - started
    if spec.get("save"):
        np.save(spec["save"], image)
    unet_calls = timings["unet"]
    return {"arm": arm, "dtype": dtype, "load_s": load_seconds, "image_s": seconds,
            "text_encoder_s": sum(timings["text_encoder"]), "unet_step_s": statistics.median(unet_calls) if unet_calls else None,
            "unet_calls": len(unet_calls), "vae_decode_s": sum(timings["vae_decode"]),
            "rss_after_load_mb": rss_after_load, "peak_rss_mb": _rss_mb(), "threads": torch.get_num_threads()}


def child_load(spec: dict) -> dict:
    """Time loading only (or reading the bytes), from a warm or cold page cache."""
    folder = Path(spec["model"])
    if spec.get("cold"):
        evict(folder)
    import torch  # noqa: F401  (imports are not timed)

    from dallecli.engine.loading import quiet_libraries

    quiet_libraries()
    arm = spec["arm"]
    if arm.startswith("dalle"):
        from dallecli.engine.generate import Engine

        engine = Engine(str(folder), "cpu", spec.get("dtype"))
    elif arm.startswith("diffusers"):
        from diffusers import DiffusionPipeline
    started = time.perf_counter()
    dtype = None
    if arm == "read":
        for path in sorted(folder.rglob("*.safetensors")):
            with open(path, "rb", buffering=0) as handle:
                while handle.read(16 * 1024 * 1024):
                    pass
    elif arm.startswith("dalle"):
        engine.pipe  # noqa: B018
        dtype = engine.dtype
    else:
        dtype = spec.get("dtype") or "float32"
        DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, torch_dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - started
    return {"arm": arm, "dtype": dtype, "seconds": seconds, "rss_mb": _current_rss_mb(), "peak_rss_mb": _rss_mb()}


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (``posix_fadvise(DONTNEED)``: no root needed)."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def alternate(kind: str, specs: list[dict], repeats: int) -> dict[str, list[dict]]:
    """Run every arm once per repeat, in turn (A B C A B C ...)."""
    runs: dict[str, list[dict]] = {spec["arm"]: [] for spec in specs}
    failed: dict[str, str] = {}
    for repeat in range(repeats):
        for spec in specs:
            if spec["arm"] in failed:
                continue
            try:
                result = run_json_child("bench.suite", kind, json.dumps({**spec, "repeat": repeat}))
            except RuntimeError as exc:  # recorded and reported; the other arms go on
                failed[spec["arm"]] = str(exc).strip().splitlines()[-1]
                print(f"  {kind} {spec['arm']} #{repeat} FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            runs[spec["arm"]].append(result)
            print(f"  {kind} {spec['arm']} #{repeat}: {json.dumps(result)}", file=sys.stderr, flush=True)
    for arm, error in failed.items():
        runs[arm] = [{"error": error}] if not runs[arm] else runs[arm]
    return runs


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


# -- sections -------------------------------------------------------------------------------------------------
def section_startup(args) -> dict:
    from bench.common import interleaved, run_process

    python = sys.executable
    dalle = str(Path(python).with_name("dalle"))
    rows = {}
    for name, command in (("dalle --help", [dalle, "--help"]), ("dalle generate --help", [dalle, "generate", "--help"])):
        ours, bare = interleaved(lambda: run_process(command), lambda: run_process([python, "-c", "pass"]),
                                 max(args.repeats, 5))
        rows[name] = {"ours_s": ours, "python_s": bare}
    probe = subprocess.run([python, "-c", "import sys\nfrom dallecli.cli.app import app\ntry:\n app(['generate', '--help'])\n"
                            "except SystemExit: pass\nprint('TORCH', 'torch' in sys.modules, 'diffusers' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT)
    line = next(l for l in probe.stdout.splitlines() if l.startswith("TORCH"))
    rows["imports_torch"] = line.split()[1] == "True" or line.split()[2] == "True"
    return rows


def section_load(args) -> dict:
    from bench import models

    folder = str(models.sd15())
    specs = [{"arm": "read", "model": folder}, {"arm": "diffusers fp32", "model": folder, "dtype": "float32"},
             {"arm": "dalle auto", "model": folder}]
    result = {"model": "sd15", "file_bytes": models.weights_bytes(Path(folder)),
              "params": sum(models.parameter_counts(Path(folder)).values())}
    for cache in ("warm", "cold"):
        if cache == "warm":
            run_json_child("bench.suite", "load", json.dumps({"arm": "read", "model": folder}))  # fill the page cache
        runs = alternate("load", [{**s, "cold": cache == "cold"} for s in specs], args.repeats)
        result[cache] = {arm: {"seconds": median_of(r, "seconds"), "peak_rss_mb": max(x["peak_rss_mb"] for x in r),
                               "rss_mb": median_of(r, "rss_mb"), "dtype": r[0]["dtype"]}
                         for arm, r in runs.items() if "error" not in r[0]}
    return result


def _generate_section(args, model: str, steps: int, guidance: float, arms: list[dict]) -> dict:
    from bench import models

    folder = str(getattr(models, model)())
    work = ROOT / "build" / "bench" / model
    work.mkdir(parents=True, exist_ok=True)
    specs = [{"model": folder, "steps": steps, "guidance": guidance, "size": 512,
              "save": str(work / f"{a['arm'].replace(' ', '_')}.npy"), **a} for a in arms]
    runs = alternate("generate", specs, args.repeats)
    result = {"model": model, "steps": steps, "guidance": guidance, "size": 512, "params": sum(models.parameter_counts(Path(folder)).values()),
              "arms": {}}
    for arm, r in list(runs.items()):
        if "error" in r[0]:
            result.setdefault("errors", {})[arm] = r[0]["error"]
            del runs[arm]
            continue
        result["arms"][arm] = {key: median_of(r, key) for key in ("load_s", "image_s", "text_encoder_s", "unet_step_s", "vae_decode_s",
                                                                   "rss_after_load_mb")}
        result["arms"][arm].update(peak_rss_mb=max(x["peak_rss_mb"] for x in r), dtype=r[0]["dtype"], threads=r[0]["threads"],
                                   unet_calls=r[0]["unet_calls"])
    import numpy as np

    from dallecli.engine.device import psnr_db

    reference = np.load(work / "diffusers_fp32.npy").astype(np.float64) / 255
    result["psnr_vs_diffusers_fp32"] = {}
    for arm in runs:
        image = np.load(work / f"{arm.replace(' ', '_')}.npy").astype(np.float64) / 255
        result["psnr_vs_diffusers_fp32"][arm] = psnr_db(reference, image)
    return result


def section_sd_turbo(args) -> dict:
    from bench import models

    taesd = str(models.taesd())
    return _generate_section(args, "sd_turbo", 1, 0.0, [
        {"arm": "diffusers fp32", "dtype": "float32"}, {"arm": "dalle auto"},
        {"arm": "diffusers bf16", "dtype": "bfloat16"}, {"arm": "dalle auto --vae tiny", "vae": taesd}])


def section_sd15(args) -> dict:
    return _generate_section(args, "sd15", SD15_STEPS, SD15_GUIDANCE, [
        {"arm": "diffusers fp32", "dtype": "float32"}, {"arm": "dalle auto"}])


def section_flops(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.models import SD15_UNET, SD21_UNET
    from diffusers import UNet2DConditionModel

    from diffusers import AutoencoderKL, AutoencoderTiny

    from bench.models import SD_VAE, TAESD

    def count(build, inputs, method="__call__") -> int:
        """FLOPs of one call, shapes only (meta tensors); on real CPU tensors if an op has no meta kernel."""
        for device in ("meta", "cpu"):
            try:
                with torch.device(device):
                    model = build()
                    args = [make() for make in inputs]
                counter = FlopCounterMode(display=False)
                with counter, torch.no_grad():
                    getattr(model, method)(*args)
                return counter.get_total_flops()
            except Exception:  # noqa: BLE001 - any op without a meta kernel: count on real tensors instead
                if device == "cpu":
                    raise
        raise AssertionError  # pragma: no cover

    result = {}
    for name, config, context in (("sd15", SD15_UNET, 768), ("sd_turbo", SD21_UNET, 1024)):
        batch = 2 if name == "sd15" else 1  # classifier-free guidance doubles the batch
        flops = count(lambda: UNet2DConditionModel(**config),
                      [lambda: torch.randn(batch, 4, 64, 64), lambda: torch.tensor([999] * batch),
                       lambda: torch.randn(batch, 77, context)])
        result[name] = {"flops": flops, "batch": batch}
    result["vae_decode"] = {"flops": count(lambda: AutoencoderKL(**SD_VAE), [lambda: torch.randn(1, 4, 64, 64)], "decode")}
    result["taesd_decode"] = {"flops": count(lambda: AutoencoderTiny(**TAESD), [lambda: torch.randn(1, 4, 64, 64)], "decode")}
    # what this CPU's matrix units actually reach: one large sgemm / bf16 gemm on every thread
    for dtype in ("float32", "bfloat16"):
        a = torch.randn(4096, 4096, dtype=getattr(torch, dtype))
        b = torch.randn(4096, 4096, dtype=getattr(torch, dtype))
        a @ b
        started = time.perf_counter()
        for _ in range(3):
            a @ b
        result[f"gemm_{dtype}_gflops"] = 3 * 2 * 4096**3 / (time.perf_counter() - started) / 1e9
    result["cpu"] = cpu_peak()
    return result


def cpu_peak() -> dict:
    """This CPU's float32 peak and what it rests on (``bench.cpu``: cores, SIMD flags, a clock and its source)."""
    from bench.cpu import measure_clock_ghz, peak, read_cpu

    cpu = read_cpu()
    return peak(cpu, measured_ghz=measure_clock_ghz(cpu))


def section_embedded(args) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.generate_bench", "--repeats", str(max(args.repeats, 3))],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    table = [l for l in done.stdout.splitlines() if l.startswith("|")]
    bf16 = run_json_child("bench.suite", "embedded-bf16", json.dumps({"repeats": max(args.repeats * 5, 10)}))
    return {"table": table, "bf16": bf16}


def child_embedded_bf16(spec: dict) -> dict:
    """Warm per-image time of the embedded model in float32 and bfloat16 (A B A B), and the PSNR between them."""
    import numpy as np

    from dallecli.engine.device import BF16_QUALITY_PAIRS, bf16_quality_holds, psnr_db
    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest

    engines = {d: Engine(None, "cpu", d) for d in ("float32", "bfloat16")}
    request = GenerationRequest("a red circle on a blue background", seed=1)
    images, times = {}, {d: [] for d in engines}
    psnrs = []
    for prompt, seed in BF16_QUALITY_PAIRS:  # quality over several seeds and prompts
        pair = {}
        for d, engine in engines.items():
            pair[d] = np.asarray(next(engine.generate(GenerationRequest(prompt, seed=seed))).image,
                                 dtype=np.float64) / 255
        psnrs.append(psnr_db(pair["float32"], pair["bfloat16"]))
        images = pair
    for _ in range(spec["repeats"]):
        for d, engine in engines.items():
            started = time.perf_counter()
            list(engine.generate(request))
            times[d].append(time.perf_counter() - started)
    worst = min(psnrs)
    return {"float32_s": statistics.median(times["float32"]), "bfloat16_s": statistics.median(times["bfloat16"]),
            "psnr_db_min": worst, "psnr_db_median": statistics.median(psnrs),
            "nan": bool(np.isnan(images["bfloat16"]).any()),
            "quality_holds": bf16_quality_holds(worst, bool(np.isnan(images["bfloat16"]).any())),
            "auto_dtype": Engine(None, "cpu").dtype}


def section_batch(args) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.batch_bench", "--prompts", "64", "--batch-sizes", "1,4,16",
                           "--repeats", str(args.repeats)], capture_output=True, text=True, cwd=ROOT, check=True)
    return {"table": [l for l in done.stdout.splitlines() if l.startswith("|")],
            "header": next((l for l in done.stdout.splitlines() if l.startswith("Machine")), "")}


# -- rendering ------------------------------------------------------------------------------------------------
def _f(value, digits=2, unit=""):
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def render(results: dict) -> str:
    from bench.render import render_markdown

    return render_markdown(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from results.json")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        child = {"generate": child_generate, "load": child_load, "embedded-bf16": child_embedded_bf16}[kind]
        print(json.dumps(child(spec)))
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"sections": {}}
    if not args.render_only:
        chosen = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(chosen) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
        from bench.common import machine

        for name in chosen:
            print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            data = globals()[f"section_{name.replace('-', '_')}"](args)
            data["_meta"] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": args.repeats,
                             "seconds": round(time.perf_counter() - started, 1),
                             "command": "python -m bench.suite " + " ".join(argv if argv is not None else sys.argv[1:])}
            results["sections"][name] = data
            results["machine"] = machine()
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1))
    # the sections other benchmarks write by hand (threads, serve, img2img, upscale, ...) follow OTHER_HEADING
    kept = ""
    if args.out.exists():
        text = args.out.read_text(encoding="utf-8")
        kept = text[text.index(OTHER_HEADING):] if OTHER_HEADING in text else ""
    args.out.write_text(render(results).rstrip("\n") + "\n\n" + kept if kept else render(results), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
