"""`dalle upscale`: tiled against one pass, seconds and peak memory, on the SD x4 upscaler's real architecture.

    python -m bench.upscale                                  # x4, a 128x128 input: tiles of 64 vs one pass
    python -m bench.upscale --size 256 --tiles 0,64,128 --steps 2 --device cuda --dtype float16
    python -m bench.upscale --model sd-x4-upscaler           # a downloaded model instead of random weights

The default model is ``stabilityai/stable-diffusion-x4-upscaler``'s published architecture (the unshrunk configs
in tests/data/replicas/stabilityai--stable-diffusion-x4-upscaler: 473 M-parameter UNet, 55 M VAE, OpenCLIP-H text
encoder) with seeded random weights, built once under build/bench-models/x4-upscaler (float16 safetensors, no
download); speed and memory are the real model's, the pictures are noise. Each arm (one ``--tiles`` value; 0 =
the whole image in one pass) runs in its own child process, so its peak memory is its own: peak RSS on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA, and how much of it the upscale itself added above the loaded model
(RSS sampled every 20 ms on the CPU). Printed: the machine (CPU model and the flags that matter for
speed), then per arm the tiles, seconds (model already loaded) and peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import machine

ROOT = Path(__file__).resolve().parents[1]
X4_CONFIGS = ROOT / "tests" / "data" / "replicas" / "stabilityai--stable-diffusion-x4-upscaler"
BUILT = ROOT / "build" / "bench-models" / "x4-upscaler"

CHILD = r"""
import json, resource, sys, threading, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from dallecli.engine.upscale import Upscaler, UpscaleRequest
model, device, dtype = sys.argv[1], sys.argv[5], sys.argv[6]
size, tile, steps = (int(value) for value in sys.argv[2:5])
upscaler = Upscaler(model, 4, device, dtype)
upscaler.pipe  # load outside the timing
image = Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))
plan = upscaler.plan(UpscaleRequest(Path("bench.png"), 4, steps=steps, seed=1, tile=tile), image.size)
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    base = rss()
highest, running = [base], True
def sample():  # the CPU's peak RSS during the upscale (ru_maxrss also holds the load's transient peak)
    while running:
        highest[0] = max(highest[0], rss()); time.sleep(0.02)
watcher = threading.Thread(target=sample, daemon=True)
if not device.startswith("cuda"):
    watcher.start()
started = time.perf_counter()
out = upscaler.upscale(image, plan, "a photo")
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - started
running = False
peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else max(highest[0], rss())
print(json.dumps({"tile": tile, "tiles": len(plan["tiles"]), "seconds": seconds, "peak_bytes": peak,
                  "working_bytes": peak - base, "output": list(out.size)}))
"""


def build_x4(folder: Path = BUILT) -> Path:
    """The x4 upscaler's published architecture with seeded random float16 weights, saved once in ``folder``."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from bench.models import OPENCLIP_H_TEXT
    from dallecli.training.vocabulary import build_clip_vocabulary

    def config(path: str) -> dict:
        return json.loads((X4_CONFIGS / path).read_text(encoding="utf-8"))

    torch.manual_seed(0)
    work = folder.with_name(folder.name + ".tmp")
    build_clip_vocabulary(["a photo of a cat"], work / "_vocab")
    tokenizer = CLIPTokenizer(vocab=str(work / "_vocab" / "vocab.json"), merges=str(work / "_vocab" / "merges.txt"),
                              model_max_length=77)
    pipe = StableDiffusionUpscalePipeline(
        vae=AutoencoderKL.from_config(config("vae/config.json")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**OPENCLIP_H_TEXT, bos_token_id=tokenizer.bos_token_id,
                                                  eos_token_id=tokenizer.eos_token_id,
                                                  pad_token_id=tokenizer.eos_token_id)),
        tokenizer=tokenizer, unet=UNet2DConditionModel.from_config(config("unet/config.json")),
        low_res_scheduler=DDPMScheduler.from_config(config("low_res_scheduler/scheduler_config.json")),
        scheduler=DDIMScheduler.from_config(config("scheduler/scheduler_config.json")), max_noise_level=350)
    pipe.to(torch.float16).save_pretrained(work / "out", safe_serialization=True, variant="fp16")
    folder.parent.mkdir(parents=True, exist_ok=True)
    (work / "out").rename(folder)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return folder


def cpu_flags_line() -> str:
    """The CPU flags that decide matmul speed, as one line."""
    from dallecli.engine.device import cpu_flags

    flags = cpu_flags()
    names = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return ", ".join(name for name in names if name in flags) or "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an upscaler alias/folder (default: the random-weight x4)")
    parser.add_argument("--size", type=int, default=128, help="input side, pixels (output: 4x)")
    parser.add_argument("--tiles", default="0,64", help="tile sides to compare, input pixels; 0 = one pass")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    model = args.model or str(build_x4())
    print(f"machine: {machine()}; flags: {cpu_flags_line()}")
    print(f"model: {model}; input {args.size}x{args.size} -> {4 * args.size}x{4 * args.size}; {args.steps} steps; "
          f"{args.device} {args.dtype}")
    print("| tile (px) | tiles | seconds | peak memory | of which the upscale itself |")
    print("|---|---|---|---|---|")
    for tile in (int(t) for t in args.tiles.split(",")):
        done = subprocess.run([sys.executable, "-c", CHILD, model, str(args.size), str(tile), str(args.steps),
                               args.device, args.dtype], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {tile or 'one pass'} | - | failed: {done.stderr.strip().splitlines()[-1:]} | - | - |")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {tile or 'one pass'} | {result['tiles']} | {result['seconds']:.1f} | "
              f"{result['peak_bytes'] / 2**20:.0f} MiB | {result['working_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
