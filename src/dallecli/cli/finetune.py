"""``dalle finetune``: train a LoRA (or the whole UNet) on a folder of images; see the README."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.completion import complete_model
from dallecli.cli.errors import Interrupted, handles_errors
from dallecli.cli.options import CacheDir, Progress, Revision, Scorer


class _Progress:
    """Rich bar on stderr (step, smoothed loss, steps/s, ETA); with --progress plain (the default off a terminal) a
    line every ~10%; with none, nothing."""

    def __init__(self, total: int, mode: str | None = None):
        from dallecli.cli.console import err

        self.total, self.console, self.mode = total, err(), mode
        self.context = self.bar = None
        self.started = self.first = None

    def start(self, at: int) -> None:
        if self.started is not None:
            return
        self.started, self.first = time.perf_counter(), at
        from dallecli.cli.console import progress_bar

        self.context = progress_bar(self.total, "training", elapsed=False, completed=at,
                                    extra_columns=("loss {task.fields[loss]}", "{task.fields[rate]} steps/s"),
                                    fields={"loss": "-", "rate": "-"}, mode=self.mode)
        self.bar = self.context.__enter__()

    def step(self, report) -> None:
        if self.started is None:
            self.start(report.step - 1)
        rate = (report.step - self.first) / max(time.perf_counter() - self.started, 1e-9)
        if self.bar.shown:
            self.bar.update(completed=report.step, loss=f"{report.loss:.4f}", rate=f"{rate:.2f}")
        elif self.bar.mode == "plain" and (report.step % max(1, self.total // 10) == 0 or report.step == self.total):
            eta = (self.total - report.step) / rate if rate else 0
            self.console.print(f"step {report.step}/{self.total}  loss {report.loss:.4f}  {rate:.2f} steps/s  "
                               f"ETA {eta:.0f}s", markup=False)

    def close(self) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None


def _interrupted(config, step: int | None) -> str:
    """What Ctrl-C kept, and the command that resumes (this command with --resume)."""
    argv = [arg for arg in sys.argv[1:] if arg not in ("--resume", "--no-resume")]
    command = shlex.join(["dalle", *argv, "--resume"])
    if step is None:
        return (f"interrupted: no checkpoint was written yet (--save-every N keeps one every N steps); {command} "
                "starts again from step 0")
    return (f"interrupted: the checkpoint of step {step} is kept in {config.output_dir() / 'checkpoints'}. "
            f"Resume with: {command}")


CAPTIONS_LISTED = 10  # lowest-scoring image/caption pairs --check-captions prints


def _check_captions(data_dir: Path, caption, caption_prefix, scorer, cache_dir, json_output: bool) -> None:
    from dallecli.cli.console import info, out, out_json, warn
    from dallecli.scoring.clip import ClipScorer
    from dallecli.scoring.files import rank_captions
    from dallecli.training.dataset import scan_folder

    scan = scan_folder(data_dir, caption, caption_prefix)
    for skipped in scan.skipped:
        warn(f"skipped {skipped.path}: {skipped.reason}")
    clip = ClipScorer.load(scorer, cache_dir)
    ranked = rank_captions(clip, scan.examples)
    scored = [r for r in ranked if r.problem is None]
    if json_output:
        out_json({"scorer": clip.describe(), "images": [r.as_dict() for r in ranked]})
        return
    info(f"{len(scored)} image/caption pair(s) scored with {clip.name}; the {min(CAPTIONS_LISTED, len(scored))} "
         "lowest (a caption that does not describe its image scores low):")
    for result in scored[:CAPTIONS_LISTED]:
        text = result.prompt if len(result.prompt) <= 60 else result.prompt[:57] + "..."
        out(f"{result.clip_score:6.2f}  {result.path}  {text}")
    for result in ranked[len(scored):]:
        warn(f"{result.path}: {result.problem}")


@handles_errors
def finetune(
    data_dir: Annotated[Path, typer.Argument(help="Folder of images with captions (.txt/.caption, metadata.jsonl or metadata.csv).")],
    model: Annotated[Optional[str], typer.Option(help="Base model: alias, repo id or folder (default: embedded).", autocompletion=complete_model)] = None,
    revision: Revision = None,
    cache_dir: CacheDir = None,
    output: Annotated[Optional[Path], typer.Option(help="Output folder (default: ./<DATA_DIR name>-lora).")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 4,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (default: the rank).")] = None,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    steps: Annotated[int, typer.Option(help="Optimiser steps in total (a resumed run stops at the same total).")] = 500,
    batch_size: Annotated[int, typer.Option(help="Images per process per micro-batch.")] = 1,
    gradient_accumulation: Annotated[int, typer.Option(help="Micro-batches per optimiser step.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the LoRA init, data order, noise, crops and samples.")] = 0,
    resolution: Annotated[Optional[int], typer.Option(help="Training size in pixels, multiple of 8 (default: the model's).")] = None,
    center_crop: Annotated[bool, typer.Option("--center-crop/--random-crop", help="Crop the centre, or a random place once per image.")] = True,
    flip: Annotated[bool, typer.Option(help="Also train on horizontally mirrored images.")] = False,
    caption: Annotated[Optional[str], typer.Option(help="Caption for images without one (e.g. 'a photo of sks cat').")] = None,
    caption_prefix: Annotated[Optional[str], typer.Option(help="Text put before every caption, joined with ', '.")] = None,
    allow_missing_captions: Annotated[bool, typer.Option(help="Train uncaptioned images on the empty caption instead of stopping.")] = False,
    train_text_encoder: Annotated[bool, typer.Option(help="Also train the text encoder (LoRA, or fully with --full).")] = False,
    full: Annotated[bool, typer.Option(help="Train all UNet weights; writes OUTPUT/model/ instead of a LoRA.")] = False,
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16 (fp16 needs CUDA).")] = "no",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations to save memory.")] = False,
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: only at the end).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in OUTPUT/checkpoints.")] = False,
    sample_prompt: Annotated[Optional[list[str]], typer.Option(help="Prompt to render during training; repeatable.")] = None,
    sample_every: Annotated[int, typer.Option(help="Steps between sample images (0: none).")] = 0,
    export_kohya: Annotated[bool, typer.Option(help="Also write lora.kohya.safetensors (kohya/A1111 keys).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    progress_display: Progress = None,
    check_captions: Annotated[bool, typer.Option("--check-captions", help="Score every image against its caption with a CLIP scorer, list the lowest, and stop (no training).")] = False,
    scorer: Scorer = None,
) -> None:
    """Fine-tune a model on a folder of your images (LoRA by default)."""
    from dallecli.cli.console import info, out, out_json, warn

    if check_captions:
        _check_captions(data_dir, caption, caption_prefix, scorer, cache_dir, json_output)
        return
    if scorer:
        from dallecli.errors import UsageError

        raise UsageError("--scorer needs --check-captions")
    from dallecli.training.finetune import FinetuneConfig, FinetuneHooks, finetune as run_finetune
    from dallecli.training.finetune_config import latest_checkpoint_step

    config = FinetuneConfig(
        data_dir=data_dir, output=output, model=model, revision=revision, cache_dir=cache_dir, rank=rank, alpha=alpha, learning_rate=learning_rate,
        steps=steps, batch_size=batch_size, gradient_accumulation=gradient_accumulation, seed=seed,
        resolution=resolution, center_crop=center_crop, flip=flip, caption=caption, caption_prefix=caption_prefix,
        allow_missing_captions=allow_missing_captions, train_text_encoder=train_text_encoder, full=full,
        mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, save_every=save_every,
        resume=resume, sample_prompts=tuple(sample_prompt or ()),
        sample_every=sample_every if sample_every or not sample_prompt else max(1, steps // 4),
        export_kohya=export_kohya,
    )
    from dallecli.cli.console import progress_mode

    progress = _Progress(steps, progress_mode(progress_display))  # a bad --progress is refused before loading

    def scanned(scan) -> None:
        for skipped in scan.skipped:
            warn(f"skipped {skipped.path}: {skipped.reason}")
        info(f"{scan.summary()} in {scan.folder}" + (f" ({len(scan.skipped)} file(s) skipped)" if scan.skipped else ""))

    def resumed(step: int) -> None:
        info(f"resumed at step {step}; {max(0, steps - step)} step(s) to go")

    hooks = FinetuneHooks(
        scanned=scanned, stage=info, notice=warn, resumed=resumed, started=progress.start, step=progress.step,
        sampled=lambda step, paths: paths and info(f"step {step}: {len(paths)} sample(s) in {paths[0].parent}"),
        saved=lambda step: None,
    )
    try:
        result = run_finetune(config, hooks)
    except KeyboardInterrupt:
        progress.close()
        raise Interrupted(_interrupted(config, latest_checkpoint_step(config))) from None
    finally:
        progress.close()
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    made = result.lora or result.model
    info(f"trained steps {result.resumed_from + 1}-{result.steps} in {result.seconds:.1f}s "
         f"({result.steps_per_second:.2f} steps/s, {result.processes} process(es)); final loss {result.loss:.4f}"
         if result.steps_run else f"nothing to train: the checkpoint is already at step {result.steps}")
    if json_output:
        out_json(result.to_dict())
    else:
        out(str(made))
        if result.kohya:
            out(str(result.kohya))
