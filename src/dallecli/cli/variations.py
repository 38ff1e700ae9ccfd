"""``dalle variations``: new images like a given one (image to image from it, with the prompt it was made from)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.errors import handles_errors
from dallecli.cli.options import Progress
from dallecli.cli.options import (BatchSize, CacheDir, Device, Dtype, Guidance, Height, ImageFormat, JsonOutput,
                                  LowMemory, Model, NegativePrompt, NumImages, OutFolder, Quality, Revision, Scheduler,
                                  Seed, Steps, Vae, Width)
from dallecli.images import stored_prompt


@handles_errors
def variations(
    image: Annotated[Path, typer.Argument(help="The image to make variations of.", show_default=False)],
    num_images: NumImages = 1,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt when the image's metadata holds none (default: empty).", show_default=False)] = None,
    seed: Seed = None,
    strength: Annotated[Optional[float], typer.Option(help="Denoising strength in (0, 1] (default 0.6: the input's shape, colour and layout stay, details move; higher strays further).", show_default=False)] = None,
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
    """Make new images like IMAGE; the prompt comes from its metadata, else --prompt, else none."""
    from dallecli.cli.console import info
    from dallecli.cli.running import prepare_run, run_local
    from dallecli.engine.request import GenerationRequest
    from dallecli.images import output_format

    found, found_negative = stored_prompt(image)
    if found is not None:
        info(f"prompt from {image.name}'s metadata: {found}" + (" (--prompt ignored)" if prompt else ""))
    request = GenerationRequest(
        prompt=found or prompt or "", negative_prompt=negative_prompt or (found_negative if found else None),
        num_images=num_images, seed=seed, steps=steps, guidance_scale=guidance, width=width, height=height,
        scheduler=scheduler, batch_size=batch_size, task="variation", image=str(image), strength=strength,
    )
    fmt = output_format(image_format, quality)
    request, folder = prepare_run(request, out, fmt)  # before any model loads
    run_local(request, folder, json_output=json_output, model=model, device=device, dtype=dtype, cache_dir=cache_dir,
              vae=vae, low_memory=low_memory, revision=revision, fmt=fmt, progress=progress)
