"""``dalle info``: the generation parameters stored in an image (ours, AUTOMATIC1111's or ComfyUI's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dallecli.cli.errors import handles_errors

_ORDER = ("prompt", "negative_prompt", "model", "model_revision", "seed", "steps", "guidance_scale", "width", "height",
          "scheduler", "sampler", "dtype", "loras", "task", "strength", "init_image", "mask", "version")


_SOURCES = {"dalle": "dalle", "a1111": "AUTOMATIC1111 parameters", "comfyui": "ComfyUI prompt graph"}


@handles_errors
def info(
    image: Annotated[Path, typer.Argument(help="A PNG, JPEG or WebP written by dalle, AUTOMATIC1111 (or a tool that writes its 'parameters') or ComfyUI.",
                                          show_default=False)],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Show the generation parameters stored in an image."""
    import json
    import shlex

    from dallecli.cli.console import out, out_json
    from dallecli.images import read_metadata

    settings = read_metadata(image)
    if json_output:
        out_json(settings)
        return
    source = settings.pop("source")
    keys = [k for k in _ORDER if k in settings] + sorted(k for k in settings if k not in _ORDER)
    width = max(len(k) for k in keys + ["source"])
    out(f"{'source':<{width}}  {_SOURCES.get(source, source)}")
    for key in keys:
        value = settings[key]
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        out(f"{key:<{width}}  {text}")
    if source == "dalle" and settings.get("task") == "upscale":
        from dallecli.engine.upscale import rerun_command

        out(f"{'rerun':<{width}}  {shlex.join(rerun_command(settings))}")
    elif source == "dalle":
        out(f"{'rerun':<{width}}  dalle generate --from {shlex.quote(str(image))}")
