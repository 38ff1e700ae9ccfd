"""``dalle upscale``: enlarge an image 2x or 4x each side with a diffusion upscaler, tiled for large inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.completion import complete_upscaler
from dallecli.cli.errors import Interrupted, handles_errors
from dallecli.cli.options import CacheDir, Device, Dtype, ImageFormat, NegativePrompt, Progress, Quality


@handles_errors
def upscale(
    image: Annotated[Path, typer.Argument(help="The image to enlarge (PNG, JPEG, WebP, ...).", show_default=False)],
    scale: Annotated[int, typer.Option(help="Enlarge each side 4x (sd-x4-upscaler) or 2x (sd-x2-latent-upscaler).")] = 4,
    model: Annotated[Optional[str], typer.Option(help="An upscaler alias, org/name repo id or folder (default: the registry's upscaler for --scale).", autocompletion=complete_upscaler)] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Text guidance (default: the prompt in the image's own metadata, else none).")] = None,
    negative_prompt: NegativePrompt = None,
    steps: Annotated[Optional[int], typer.Option(help="num_inference_steps per tile (default: the model's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale; 1 or less turns it off (default: the model's).")] = None,
    noise_level: Annotated[Optional[int], typer.Option(help="x4 only: noise added to the input, 0-350; more invents more detail (default 20).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the starting noise. Random if omitted or -1.")] = None,
    tile: Annotated[Optional[int], typer.Option(help="Tile side in input pixels, bounding memory (default: 128 for x4, 512 for x2; 0: one pass).")] = None,
    overlap: Annotated[Optional[int], typer.Option(help="Overlap of neighbouring tiles in input pixels, blended (default: a quarter of --tile).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: ./dalle-out or $DALLE_OUTPUT_DIR).")] = None,
    image_format: ImageFormat = None,
    quality: Quality = None,
    cache_dir: CacheDir = None,
    device: Device = None,
    dtype: Dtype = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of the path.")] = False,
    progress: Progress = None,
) -> None:
    """Enlarge an image with a diffusion upscaler (tiled, so memory stays bounded)."""
    from dallecli.cli.console import info, out as print_line, out_json, progress_bar, progress_mode, warn
    from dallecli.cli.running import user_device
    from dallecli.config import default_output_dir, user_default
    from dallecli.engine.inputs import load_init_image
    from dallecli.engine.schedulers import a1111_sampler
    from dallecli.engine.upscale import UpscaleRequest, Upscaler, check_request, check_scale, upscale_file
    from dallecli.images import (check_image_size, check_metadata_room, output_format, prepare_output_folder,
                                 stored_prompt, write_image)

    check_scale(scale)  # before anything is read or loaded
    fmt = output_format(image_format, quality)
    source = load_init_image(image, "IMAGE")
    check_image_size(fmt, source.size[0] * scale, source.size[1] * scale, "the upscaled image")
    check_metadata_room(fmt, prompt or stored_prompt(image)[0], negative_prompt)
    folder = prepare_output_folder(out or default_output_dir())
    request = UpscaleRequest(image=image, scale=scale, model=model, prompt=prompt, negative_prompt=negative_prompt,
                             steps=steps, guidance=guidance, noise_level=noise_level, seed=seed, tile=tile,
                             overlap=overlap)
    check_request(request)  # the settings that need no model, before looking for it
    mode = progress_mode(progress)  # a bad --progress or DALLE_PROGRESS is refused before anything loads
    upscaler = Upscaler(model, scale, user_device(device), dtype or user_default("dtype"), cache_dir)
    for notice in upscaler.notices:
        info(notice)
    plan = upscaler.plan(request, source.size)  # refuses bad settings before the model loads
    if len(plan["tiles"]) > 1:
        info(f"{source.size[0]}x{source.size[1]} in {len(plan['tiles'])} tiles of {plan['tile']} px "
             f"(overlap {plan['overlap']} px)")
    with progress_bar(len(plan["tiles"]) * plan["steps"], "upscaling", mode=mode) as bar:
        try:
            with bar.loading():
                upscaler.pipe  # noqa: B018 - load here, so that the bar says "loading model", not 0/N
            result = upscale_file(upscaler, request, lambda done, total: bar.advance(), input_image=source,
                                  plan=plan)
        except KeyboardInterrupt:
            raise Interrupted("interrupted: nothing was written") from None
    for message in result.warnings:
        warn(message)
    path = write_image(result.image, folder, result.settings, a1111_sampler(result.settings["scheduler"]), fmt=fmt)
    if json_output:
        out_json({"images": [{"path": str(path), "seed": result.settings["seed"]}], "parameters": result.settings})
    else:
        print_line(str(path))
