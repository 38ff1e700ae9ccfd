"""``dalle score``: the CLIP score of images against a text, or against the prompt each image stores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.errors import handles_errors
from dallecli.cli.options import CacheDir, Device, JsonOutput, Scorer


@handles_errors
def score(
    images: Annotated[list[Path], typer.Argument(help="Images (PNG, JPEG, WebP) or folders of them; a batch output folder also gets a scored copy of its manifest.", show_default=False)],
    prompt: Annotated[Optional[str], typer.Option(help="Text to score against (default: the prompt stored in each image).", show_default=False)] = None,
    scorer: Scorer = None,
    cache_dir: CacheDir = None,
    device: Device = None,
    json_output: JsonOutput = False,
) -> None:
    """Score images against a text with CLIP (100 x cosine similarity, 0-100; higher matches better)."""
    from dallecli.cli.console import info, out, out_json, warn
    from dallecli.errors import DalleError
    from dallecli.scoring.clip import ClipScorer
    from dallecli.scoring.files import collect_images, score_files, write_scored_manifest

    if prompt is not None and not prompt.strip():
        from dallecli.errors import UsageError

        raise UsageError("--prompt is empty; give a text, or leave it out to use each image's stored prompt")
    paths = collect_images(images)
    clip = ClipScorer.load(scorer, cache_dir, device)
    results = score_files(clip, paths, prompt)
    copies = [copy for folder in images if folder.is_dir()
              if (copy := write_scored_manifest(folder, [r for r in results if r.problem is None], clip))]
    if json_output:
        out_json({"scorer": clip.describe(), "images": [r.as_dict() for r in results],
                  "manifests": [str(c) for c in copies]})
    else:
        for result in results:
            if result.problem is None:
                text = result.prompt if len(result.prompt) <= 60 else result.prompt[:57] + "..."
                out(f"{result.clip_score:6.2f}  {result.path}  {text}")
        for copy in copies:
            info(f"scores added to a copy of the manifest: {copy}")
    for result in results:
        if result.problem:
            warn(f"{result.path}: {result.problem}")
    if all(r.problem for r in results):
        raise DalleError("no image was scored")
