"""``dalle generate``: text to images with one model, written as PNGs with their parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.errors import handles_errors
from dallecli.cli.options import (Backend, BatchSize, CacheDir, ClipSkip, Device, Dtype, Guidance, Height, ImageFormat,
                                  JsonOutput, KeepCandidates, LowMemory, Model, NegativePrompt, NumImages, OutFolder,
                                  Progress, Quality, Rerank, Revision, Scheduler, Scorer, Seed, Steps, Strength, Vae,
                                  Width)


@handles_errors
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="What to draw.", show_default=False)] = None,
    num_images: NumImages = 1,
    seed: Seed = None,
    steps: Steps = None,
    guidance: Guidance = None,
    width: Width = None,
    height: Height = None,
    negative_prompt: NegativePrompt = None,
    model: Model = None,
    revision: Revision = None,
    cache_dir: CacheDir = None,
    scheduler: Scheduler = None,
    clip_skip: ClipSkip = None,
    out: OutFolder = None,
    image_format: ImageFormat = None,
    quality: Quality = None,
    batch_size: BatchSize = None,
    device: Device = None,
    dtype: Dtype = None,
    backend: Backend = None,
    vae: Vae = None,
    low_memory: LowMemory = None,
    json_output: JsonOutput = False,
    progress: Progress = None,
    rerank: Rerank = None,
    keep_candidates: KeepCandidates = False,
    scorer: Scorer = None,
    from_image: Annotated[Optional[Path], typer.Option("--from", help="Re-run the request stored in an image (dalle's, AUTOMATIC1111's or ComfyUI's PNG, JPEG or WebP).")] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="LoRA to apply, PATH[:SCALE] or a registry LoRA NAME[:SCALE] after `dalle download NAME` (scale 1 by default); repeatable.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Init image: image to image from it (its size, rounded to multiples of 8, unless --width/--height).", show_default=False)] = None,
    strength: Strength = None,
    server: Annotated[Optional[str], typer.Option(envvar="DALLE_SERVER", show_envvar=True, help="URL of a running `dalle serve` to generate with (its model stays loaded); the images are written here.")] = None,
) -> None:
    """Generate images from a text prompt (or from an init image with --image)."""
    from dallecli.cli.console import out as print_line, out_json
    from dallecli.cli.running import prepare_rerank, prepare_run, run_local
    from dallecli.config import user_default
    from dallecli.images import output_format, read_metadata
    from dallecli.engine.request import GenerationRequest
    from dallecli.engine.lora import parse_lora
    from dallecli.engine.replay import merge_stored, replay_inputs, request_fields
    from dallecli.errors import UsageError

    fmt = output_format(image_format, quality)
    stored = read_metadata(from_image) if from_image else {}
    merged = merge_stored(stored, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                          guidance_scale=guidance, width=width, height=height, model=model, dtype=dtype, vae=vae,
                          backend=backend, clip_skip=clip_skip, scheduler=scheduler,
                          loras=tuple(parse_lora(text) for text in lora) if lora else None)
    inputs = replay_inputs(stored, from_image, image, strength)
    if merged["prompt"] is None:
        raise UsageError("give a PROMPT (or --from IMAGE.png)")
    model, dtype, vae, backend = merged["model"], merged["dtype"], merged["vae"], merged["backend"]
    request = GenerationRequest(num_images=num_images, batch_size=batch_size, **request_fields(merged), **inputs)
    request, folder = prepare_run(request, out, fmt)  # before any model loads
    best_of = prepare_rerank(rerank, keep_candidates, scorer, cache_dir)
    if server and best_of is not None:
        raise UsageError("--rerank runs locally only (the scorer is loaded here); leave out --server")
    if server and request.image is not None:
        raise UsageError("--image (and --from an img2img or edit image) runs locally only; leave out --server")
    if server and fmt.name != "png":
        raise UsageError(f"--format {fmt.name} is written by a local run only (`dalle serve` sends PNGs); leave out "
                         "--server or --format")
    if server:  # a running `dalle serve` makes the images; they are written here as an in-process run writes them
        from dallecli.serve.client import check_local_options, generate_on_server

        check_local_options(request, revision=revision, cache_dir=cache_dir, device=device, dtype=dtype, vae=vae,
                            low_memory=low_memory, backend=backend)
        made = generate_on_server(server, request, model or user_default("model"), folder)
        if json_output:
            out_json({"images": [{"path": str(path), "seed": s["seed"]} for path, s in made],
                      "parameters": {k: v for k, v in made[-1][1].items() if k != "seed"}})
        for path, _ in made if not json_output else []:
            print_line(str(path))
        return

    run_local(request, folder, json_output=json_output, model=model, device=device, dtype=dtype, cache_dir=cache_dir,
              vae=vae, low_memory=low_memory, revision=revision, backend=backend,
              recorded_revision=merged["recorded_revision"], fmt=fmt, progress=progress, best_of=best_of)
