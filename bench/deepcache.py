"""DeepCache feature reuse on SD 1.5 at 25 steps (issue #17, target 4): what it saves, and what it costs in quality.

    pip install DeepCache==0.1.1      # the authors' reference implementation; for this benchmark only
    python -m bench.deepcache         # about 8 minutes on 2 cores with AMX, longer without

DeepCache (Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024, arXiv:2312.00858)
runs the whole UNet every ``cache_interval`` steps and, in between, only its outermost down and up blocks, reusing
the deep features cached at the last full step. Its helper wraps a loaded diffusers pipeline's UNet blocks, so it
runs on dalle's pipeline unchanged.

Speed: the SD 1.5 architecture with random weights (``bench/models.py``), 512², 25 steps, guidance 7.5, seed 1,
one 2-step warm-up call then one timed call per arm, each arm in its own process: plain diffusers float32 (the
reference), dalle auto, dalle auto with DeepCache. Random weights make the speed real and the pictures noise, so
quality is measured where the features are trained: the embedded model (its default 12 steps and guidance),
over :data:`dallecli.engine.device.BF16_QUALITY_PAIRS`, DeepCache against the same engine without it (PSNR, the
project's quality rule: ≥ 30 dB).

Raw results: build/bench/deepcache.json. The machine line records the CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.common import run_json_child

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "build" / "bench" / "deepcache.json"
PROMPT = "a red circle on a blue background"
STEPS, GUIDANCE = 25, 7.5


def _with_deepcache(pipe, interval: int):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    return helper


def child_speed(spec: dict) -> dict:
    """One speed arm in this process: load, warm up, time one 25-step image."""
    import numpy as np
    import torch

    from dallecli.engine.loading import quiet_libraries
    from bench.suite import _rss_mb

    quiet_libraries()
    if spec["arm"] == "diffusers fp32":
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(spec["model"], use_safetensors=True, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        dtype = "float32"

        def run(steps=STEPS):
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, width=512, height=512,
                        generator=torch.Generator().manual_seed(1)).images[0]
    else:
        from dallecli.engine.generate import Engine
        from dallecli.engine.request import GenerationRequest

        engine = Engine(spec["model"], "cpu")
        dtype = engine.dtype
        request = GenerationRequest(PROMPT, seed=1, steps=STEPS, guidance_scale=GUIDANCE, width=512, height=512)

        def run(steps=STEPS):
            return next(engine.generate(replace(request, steps=steps))).image
    run(2)  # warm-up at the same shapes (oneDNN primitives, page-ins); 2 steps, not 25
    if spec.get("interval"):
        _with_deepcache(engine.pipe, spec["interval"])
    started = time.perf_counter()
    image = run()
    seconds = time.perf_counter() - started
    np.save(spec["image_out"], np.asarray(image))
    return {"arm": spec["arm"], "dtype": dtype, "seconds": seconds, "peak_rss_mb": _rss_mb(),
            "threads": torch.get_num_threads()}


def child_quality(spec: dict) -> dict:
    """DeepCache against no DeepCache on the embedded model, same engine, every quality pair."""
    import numpy as np

    from dallecli.engine.device import BF16_QUALITY_PAIRS, psnr_db
    from dallecli.engine.generate import Engine
    from dallecli.engine.request import GenerationRequest

    engine = Engine(None, "cpu", spec.get("dtype"))

    def images():
        return [np.asarray(next(engine.generate(GenerationRequest(p, seed=s))).image, dtype=np.float64) / 255
                for p, s in BF16_QUALITY_PAIRS]

    plain = images()
    helper = _with_deepcache(engine.pipe, spec["interval"])
    cached = images()
    helper.disable()
    values = [psnr_db(a, b) for a, b in zip(plain, cached)]
    return {"dtype": engine.dtype, "steps": engine.defaults()["steps"], "interval": spec["interval"],
            "psnr_db": values, "psnr_db_min": min(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=int, default=3, help="DeepCache's cache_interval (full UNet every N steps)")
    parser.add_argument("--quality-only", action="store_true", help="the embedded-model quality check alone")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, spec = args.child
        print(json.dumps({"speed": child_speed, "quality": child_quality}[kind](json.loads(spec))))
        return 0
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        parser.error("this benchmark needs the DeepCache package: pip install DeepCache==0.1.1")
    import numpy as np

    from bench import models
    from bench.common import machine
    from dallecli.engine.device import psnr_db

    started = time.time()
    result = {"machine": machine(), "interval": args.interval}
    for dtype in ("float32", None):  # None: dalle's auto dtype on this CPU
        quality = run_json_child("bench.deepcache", "quality", json.dumps({"interval": args.interval, "dtype": dtype}))
        result.setdefault("quality", []).append(quality)
        print(f"embedded model, {quality['dtype']}, {quality['steps']} steps, interval {args.interval}: PSNR "
              f"DeepCache vs none worst {quality['psnr_db_min']:.1f} dB "
              f"({', '.join(f'{v:.1f}' for v in quality['psnr_db'])})", file=sys.stderr, flush=True)
    if not args.quality_only:
        folder = models.sd15()
        work = RESULTS.parent / "deepcache"
        work.mkdir(parents=True, exist_ok=True)
        arms = [{"arm": "diffusers fp32"}, {"arm": "dalle auto"},
                {"arm": f"dalle auto + DeepCache {args.interval}", "interval": args.interval}]
        for arm in arms:
            out = dict(arm, model=str(folder), image_out=str(work / f"{arm['arm'].replace(' ', '_')}.npy"))
            measured = run_json_child("bench.deepcache", "speed", json.dumps(out))
            measured["image"] = out["image_out"]
            result.setdefault("speed", []).append(measured)
            print(f"  {json.dumps(measured)}", file=sys.stderr, flush=True)
        base = result["speed"][0]
        reference = np.load(base["image"]).astype(np.float64) / 255
        print(f"Machine: {result['machine']}; SD 1.5 architecture (random weights), 512², {STEPS} steps, "
              f"guidance {GUIDANCE}, one timed call per arm")
        print("| arm | dtype | per image | × diffusers fp32 | PSNR vs diffusers fp32 | peak RSS |\n|---|---|---|---|---|---|")
        for arm in result["speed"]:
            quality = psnr_db(reference, np.load(arm["image"]).astype(np.float64) / 255)
            print(f"| {arm['arm']} | {arm['dtype']} | {arm['seconds']:.1f} s | {arm['seconds'] / base['seconds']:.2f}× "
                  f"| {quality:.1f} dB | {arm['peak_rss_mb'] / 1024:.2f} GiB |")
    for quality in result["quality"]:
        print(f"Embedded model ({quality['dtype']}, {quality['steps']} steps): DeepCache interval "
              f"{quality['interval']} against none, worst PSNR {quality['psnr_db_min']:.1f} dB over "
              f"{len(quality['psnr_db'])} prompt/seed pairs (rule: ≥ 30 dB)")
    result["seconds"] = time.time() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
