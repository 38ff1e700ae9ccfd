"""PyTorch levers for the CPU per-image time, one component at a time (issue #17).

    python -m bench.levers                    # SD-Turbo architecture, 512², UNet step and VAE decode, 2 repeats
    python -m bench.levers --arms fp32,fp32-cl --repeats 3

Each arm loads the SD-Turbo-architecture pipeline with random weights (``bench/models.py``) in a fresh process,
applies one lever, and times the two parts that make up nearly all of an SD-Turbo image on a CPU: one UNet call
on (1, 4, 64, 64) latents with the prompt's embeddings, and the VAE decode of those latents to (1, 3, 512, 512).
Inputs are the same on every arm (seed 1); outputs are compared with the ``fp32`` arm's (PSNR of the decoded
image, relative error of the UNet output). Times are the median of ``--calls`` timed calls after one warm-up call
(oneDNN builds its primitives there; ``torch.compile`` compiles there, and that time is reported separately).

Arms (``--arms``):
- ``fp32``: float32, contiguous (NCHW): what plain diffusers runs; the reference;
- ``fp32-cl``: float32, UNet and VAE in ``channels_last`` (NHWC) memory format;
- ``bf16``, ``bf16-cl``: bfloat16 weights and activations, contiguous or channels_last;
- ``vae-bf16-cl``: UNet float32, VAE bfloat16 channels_last (the decode is the larger part);
- ``fp32-cl-compile``: ``fp32-cl`` with the VAE decoder and UNet through ``torch.compile`` (inductor, freezing);
- ``fp32-dalle-loader``: ``fp32``, loaded by dallecli's loader (``load_fresh_pipeline``, its thread policy included)
  instead of ``DiffusionPipeline.from_pretrained``.

Raw results: build/bench/levers.json. The machine line records the CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import run_json_child
from bench.suite import PROMPT, _current_rss_mb, _rss_mb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "build" / "bench" / "levers.json"
ARMS = {
    "fp32": {"dtype": "float32", "channels_last": False},
    "fp32-cl": {"dtype": "float32", "channels_last": True},
    "bf16": {"dtype": "bfloat16", "channels_last": False},
    "bf16-cl": {"dtype": "bfloat16", "channels_last": True},
    "vae-bf16-cl": {"dtype": "float32", "vae_dtype": "bfloat16", "channels_last": True},
    "fp32-cl-compile": {"dtype": "float32", "channels_last": True, "compile": True},
    "fp32-dalle-loader": {"dtype": "float32", "channels_last": False, "loader": "dalle"},
}
DEFAULT_ARMS = "fp32,fp32-dalle-loader,fp32-cl,bf16,bf16-cl,vae-bf16-cl"


def child(spec: dict) -> dict:
    """One arm in this process: load, apply the lever, time the UNet call and the VAE decode."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from dallecli.engine.loading import quiet_libraries

    quiet_libraries()
    arm = ARMS[spec["arm"]]
    dtype = getattr(torch, arm["dtype"])
    vae_dtype = getattr(torch, arm.get("vae_dtype", arm["dtype"]))
    if arm.get("loader") == "dalle":
        from dallecli.engine.loading import load_fresh_pipeline

        pipe = load_fresh_pipeline(Path(spec["model"]), "float32", cpu_threads=True)
    else:
        pipe = DiffusionPipeline.from_pretrained(spec["model"], use_safetensors=True, torch_dtype=torch.float32)
    size = spec["size"]
    with torch.inference_mode():
        embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)  # float32 on every arm: the same input
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn((1, 4, size // 8, size // 8), generator=generator)
    timestep = torch.tensor(999)
    pipe.unet.to(dtype)
    pipe.vae.to(vae_dtype)
    if arm["channels_last"]:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    unet, decode = pipe.unet, pipe.vae.decode
    compile_s = None
    if arm.get("compile"):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        unet = torch.compile(pipe.unet)
        decode = torch.compile(pipe.vae.decode)
    rss_loaded = _current_rss_mb()

    def unet_call():
        sample = latents.to(dtype)
        if arm["channels_last"]:
            sample = sample.contiguous(memory_format=torch.channels_last)
        return unet(sample, timestep, encoder_hidden_states=embeds.to(dtype)).sample

    def decode_call():
        sample = (latents / pipe.vae.config.scaling_factor).to(vae_dtype)
        if arm["channels_last"]:
            sample = sample.contiguous(memory_format=torch.channels_last)
        return decode(sample).sample

    def timed(function):
        with torch.inference_mode():
            started = time.perf_counter()
            function()  # warm-up (and compile)
            first = time.perf_counter() - started
            seconds = []
            for _ in range(spec["calls"]):
                started = time.perf_counter()
                out = function()
                seconds.append(time.perf_counter() - started)
        return statistics.median(seconds), first, out

    unet_s, unet_first, noise = timed(unet_call)
    decode_s, decode_first, image = timed(decode_call)
    if arm.get("compile"):
        compile_s = unet_first - unet_s + decode_first - decode_s
    image = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    np.save(spec["image_out"], image)
    torch.save(noise.float().contiguous(), spec["noise_out"])  # read back by the parent with weights_only
    return {"arm": spec["arm"], "unet_step_s": unet_s, "vae_decode_s": decode_s, "compile_s": compile_s,
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": _rss_mb(), "threads": torch.get_num_threads()}


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=DEFAULT_ARMS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--child")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import numpy as np
    import torch

    from bench import models
    from bench.common import machine

    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if "fp32" not in arms:
        arms.insert(0, "fp32")
    folder = models.sd_turbo()
    work = RESULTS.parent / "levers"
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    started = time.time()
    for repeat in range(args.repeats):
        for arm in arms:
            spec = {"arm": arm, "model": str(folder), "size": args.size, "calls": args.calls,
                    "image_out": str(work / f"{arm}.npy"), "noise_out": str(work / f"{arm}.pt")}
            result = run_json_child("bench.levers", json.dumps(spec))
            runs[arm].append(result)
            print(f"  {arm} #{repeat}: {json.dumps(result)}", file=sys.stderr, flush=True)
    reference_image = np.load(work / "fp32.npy")
    reference_noise = torch.load(work / "fp32.pt", weights_only=True)
    summary = []
    base = {k: statistics.median(r[k] for r in runs["fp32"]) for k in ("unet_step_s", "vae_decode_s")}
    print(f"Machine: {machine()}; {args.size}x{args.size}, {args.repeats} repeats x {args.calls} calls")
    print("| arm | UNet step | × fp32 | VAE decode | × fp32 | UNet rel. error | image PSNR vs fp32 | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in arms:
        unet_s = statistics.median(r["unet_step_s"] for r in runs[arm])
        decode_s = statistics.median(r["vae_decode_s"] for r in runs[arm])
        noise = torch.load(work / f"{arm}.pt", weights_only=True)
        error = float((noise - reference_noise).norm() / reference_noise.norm())
        quality = psnr(np.load(work / f"{arm}.npy"), reference_image)
        peak = max(r["peak_rss_mb"] for r in runs[arm]) / 1024
        summary.append({"arm": arm, "unet_step_s": unet_s, "vae_decode_s": decode_s, "unet_rel_error": error,
                        "psnr_db": quality, "peak_rss_gib": peak, "runs": runs[arm]})
        print(f"| {arm} | {unet_s:.2f} s | {unet_s / base['unet_step_s']:.2f}× | {decode_s:.2f} s | "
              f"{decode_s / base['vae_decode_s']:.2f}× | {error:.1e} | {quality:.1f} dB | {peak:.2f} GiB |")
    RESULTS.write_text(json.dumps({"machine": machine(), "size": args.size, "seconds": time.time() - started,
                                   "arms": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
