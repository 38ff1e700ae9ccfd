"""``dalle edit``: repaint the masked part of an image from a prompt (inpainting); the rest is kept pixel for pixel."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.errors import handles_errors
from dallecli.cli.options import Progress
from dallecli.cli.options import (BatchSize, CacheDir, Device, Dtype, Guidance, Height, ImageFormat, JsonOutput,
                                  LowMemory, Model, NegativePrompt, NumImages, OutFolder, Quality, Revision, Scheduler,
                                  Seed, Steps, Strength, Vae, Width)


@handles_errors
def edit(
    image: Annotated[Path, typer.Argument(help="The image to edit (PNG, JPEG, WebP, ...).", show_default=False)],
    prompt: Annotated[str, typer.Argument(help="What to paint in the masked area.", show_default=False)],
    mask: Annotated[Optional[Path], typer.Option(help="White = repaint, black = keep (transparent = repaint in a mask with alpha); the image's size. Default: the image's own transparent pixels.", show_default=False)] = None,
    num_images: NumImages = 1,
    seed: Seed = None,
    strength: Strength = None,
    steps: Steps = None,
    guidance: Guidance = None,
    width: Width = None,
    height: Height = None,
    negative_prompt: NegativePrompt = None,
    model: Model = None,
    revision: Revision = None,
    cache_dir: CacheDir = None,
    scheduler: Scheduler = None,
    out: OutFolder = None,
    image_format: ImageFormat = None,
    quality: Quality = None,
    batch_size: BatchSize = None,
    device: Device = None,
    dtype: Dtype = None,
    vae: Vae = None,
    low_memory: LowMemory = None,
    json_output: JsonOutput = False,
    progress: Progress = None,
) -> None:
    """Repaint the masked area of an image from a prompt (strength 1 by default); unmasked pixels are kept exactly."""
    from dallecli.cli.running import prepare_run, run_local
    from dallecli.engine.request import GenerationRequest
    from dallecli.images import output_format

    request = GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt or None, num_images=num_images, seed=seed, steps=steps,
        guidance_scale=guidance, width=width, height=height, scheduler=scheduler, batch_size=batch_size,
        task="inpaint", image=str(image), mask=str(mask) if mask is not None else None, strength=strength,
    )
    fmt = output_format(image_format, quality)
    request, folder = prepare_run(request, out, fmt)  # before any model loads
    run_local(request, folder, json_output=json_output, model=model, device=device, dtype=dtype, cache_dir=cache_dir,
              vae=vae, low_memory=low_memory, revision=revision, fmt=fmt, progress=progress)
