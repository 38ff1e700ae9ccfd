"""LoRA fine-tuning steps/s: ``dalle finetune``'s loop against diffusers' own recipe, in the same run.

    nice -n 19 python -m bench.finetune_bench --model shapes --steps 40          # the embedded model
    nice -n 19 python -m bench.finetune_bench --steps 40                         # a tiny random SD pipeline

The baseline is the loop of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``: ``peft`` LoRA on
``to_q/to_k/to_v/to_out.0``, images transformed every step, VAE ``latent_dist.sample()`` and text encoder run
every step, ``DDPMScheduler`` noise, MSE loss, AdamW. Ours caches latents and caption embeddings once. Each arm runs
in its own child process (so peak RSS is its own); arms alternate, the median steps/s of ``--repeats`` is kept.
Model loading and caching are not timed; only the optimisation steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


def baseline(model: str | None, steps: int, batch_size: int, resolution: int | None) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from dallecli.weightfiles import default_size
    from dallecli.engine.inputs import load_rgb
    from dallecli.training.dataset import image_tensor, resize_and_crop, scan_folder
    from dallecli.training.finetune_model import UNET_TARGETS, load_components

    resolved, pipe = load_components(model)
    size = resolution or default_size(resolved.path) or 512
    examples = scan_folder(PHOTOS).examples
    images = [load_rgb(e.path) for e in examples]
    captions = [e.caption for e in examples]
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    max_length = min(tokenizer.model_max_length, 77)
    scaling = getattr(vae.config, "scaling_factor", 1.0) or 1.0
    unet.train()

    def step(index: int) -> None:
        chosen = [(index * batch_size + k) % len(images) for k in range(batch_size)]
        pixels = torch.stack([image_tensor(resize_and_crop(images[i], size)) for i in chosen])
        ids = tokenizer([captions[i] for i in chosen], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt").input_ids
        encoded = vae.encode(pixels)
        latents = (encoded.latent_dist.sample() if hasattr(encoded, "latent_dist") else encoded.latents) * scaling
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids)[0]
        target = noise_scheduler.get_velocity(latents, noise, timesteps) \
            if noise_scheduler.config.prediction_type == "v_prediction" else noise
        loss = F.mse_loss(unet(noisy, timesteps, hidden).sample.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(2):
        step(i)
    started = time.perf_counter()
    for i in range(steps):
        step(i + 2)
    return {"steps_per_second": steps / (time.perf_counter() - started)}


def ours(model: str | None, steps: int, batch_size: int, resolution: int | None) -> dict:
    from dallecli.training.finetune import FinetuneConfig, FinetuneHooks, finetune

    marks: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        finetune(FinetuneConfig(PHOTOS, output=Path(tmp) / "out", model=model, steps=steps + 2,
                                batch_size=batch_size, resolution=resolution),
                 FinetuneHooks(step=lambda report: marks.setdefault(report.step, time.perf_counter())))
    return {"steps_per_second": steps / (marks[steps + 2] - marks[2])}


def child(arm: str, args) -> dict:
    command = [sys.executable, "-m", "bench.finetune_bench", "--arm", arm, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size)]
    command += ["--model", args.model] if args.model else []
    command += ["--resolution", str(args.resolution)] if args.resolution else []
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model for both arms (default: a tiny random SD pipeline)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arm", choices=["ours", "baseline"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        result = (ours if args.arm == "ours" else baseline)(args.model, args.steps, args.batch_size, args.resolution)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    from bench.common import machine

    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_tiny_pipeline

        args.model = str(build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny-sd"))
    runs = {"ours": [], "baseline": []}
    for _ in range(args.repeats):
        for arm in ("baseline", "ours"):
            runs[arm].append(child(arm, args))
    report = {arm: {"steps_per_second": round(statistics.median(r["steps_per_second"] for r in rs), 3),
                    "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1)} for arm, rs in runs.items()}
    report["ratio"] = round(report["ours"]["steps_per_second"] / report["baseline"]["steps_per_second"], 2)
    print(f"# {machine()}; model {args.model}; batch {args.batch_size}; {args.steps} timed steps", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
