"""``dalle batch``: images for every prompt of a file, with one loaded model; resumable and shardable."""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.errors import Interrupted, handles_errors
from dallecli.cli.options import (Backend, CacheDir, ClipSkip, Device, Dtype, Guidance, Height, ImageFormat,
                                  KeepCandidates, LowMemory, Model, NegativePrompt, Progress, Quality, Rerank, Revision,
                                  Scheduler, Scorer, Steps, Vae, Width)


@handles_errors
def batch(
    file: Annotated[Path, typer.Argument(help="Prompt file: .txt (one prompt a line), .csv/.tsv (a 'prompt' column) or .jsonl; - reads stdin.", show_default=False)],
    num_images: Annotated[int, typer.Option("-n", "--num-images", help="Images per prompt (a row's 'n' overrides).")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="Base seed: image i of row r gets seed + 1000*r + i. Random if omitted or -1 (kept in the manifest).")] = None,
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
    out: Annotated[Optional[Path], typer.Option(help="Output folder for the images and manifest.jsonl (default: ./dalle-out or $DALLE_OUTPUT_DIR).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass, across prompts with the same settings; seeds do not depend on it.")] = 4,
    device: Device = None,
    dtype: Dtype = None,
    backend: Backend = None,
    vae: Vae = None,
    low_memory: LowMemory = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of the paths.")] = False,
    progress: Progress = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Skip malformed rows instead of stopping before generating.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Make every image again, replacing the ones already finished.")] = False,
    shard: Annotated[Optional[str], typer.Option(help="I/N: take rows r with r mod N == I (default: RANK/WORLD_SIZE under torchrun/accelerate).")] = None,
    image_format: ImageFormat = None,
    quality: Quality = None,
    grid: Annotated[bool, typer.Option("--grid", help="Also write a contact sheet of the finished images (grid.png; a shard's grid-I-of-N.png, and grid.png once every shard is done).")] = False,
    grid_label: Annotated[Optional[str], typer.Option(metavar="none|prompt|seed", help="Label each grid cell with its prompt or seed (implies --grid).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the file and print how many prompts and images it holds; load no model.")] = False,
    input_format: Annotated[Optional[str], typer.Option("--input-format", metavar="txt|csv|tsv|jsonl", help="Format of the prompts, for stdin (default txt) or a file without a known suffix.", show_default=False)] = None,
    rerank: Rerank = None,
    keep_candidates: KeepCandidates = False,
    scorer: Scorer = None,
) -> None:
    """Generate images for every prompt in a file; re-run the same command to resume."""
    from dallecli.batch.grid import LABELS
    from dallecli.batch.plan import BatchOptions, parse_shard, shard_from_env, validate_options
    from dallecli.batch.prompts import STDIN_NAME, check_format, parse_prompts, read_prompt_file
    from dallecli.batch.session import BatchRun, check_prompts, count_prompts, shard_device
    from dallecli.cli.console import (info, loading, out as print_line, out_json, progress_bar, progress_mode,
                                      report_memory_choice, warn)
    from dallecli.cli.running import prepare_rerank, user_device
    from dallecli.config import default_output_dir, setting_source, user_default
    from dallecli.engine.request import RANDOM_SEED
    from dallecli.engine.schedulers import validate_scheduler
    from dallecli.errors import DalleError, UsageError
    from dallecli.images import output_format, prepare_output_folder

    scheduler_source = "--scheduler" if scheduler else setting_source("scheduler") or "--scheduler"
    scheduler = scheduler or user_default("scheduler")
    mode = progress_mode(progress)  # a bad --progress or DALLE_PROGRESS is refused before anything loads
    seed = None if seed == RANDOM_SEED else seed  # A1111's "random"
    options = BatchOptions(n=num_images, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                           negative_prompt=negative_prompt or None, scheduler=scheduler, batch_size=batch_size,
                           clip_skip=clip_skip if clip_skip != 1 else None, rerank=rerank)
    validate_options(options)  # before anything loads
    validate_scheduler(scheduler, scheduler_source)
    out_format = output_format(image_format, quality)
    if grid_label is not None and grid_label not in LABELS:
        raise UsageError(f"--grid-label {grid_label!r} is not one of {', '.join(LABELS)}")
    if grid or grid_label is not None:
        grid_label = grid_label or "none"
    env_shard = shard_from_env() if shard is None else None
    shard_spec = parse_shard(shard) if shard is not None else env_shard
    stdin_data = None
    if str(file) == "-":  # the prompts come from a pipe (or are typed)
        fmt = check_format(input_format or "txt")
        if sys.stdin.isatty():
            info(f"reading {fmt} prompts from stdin; end with Ctrl-D")
        stdin_data = sys.stdin.buffer.read()
        prompts, source = parse_prompts(stdin_data, fmt, STDIN_NAME), "stdin"
    else:
        prompts, source = read_prompt_file(file, input_format), str(file)
    if prompts.encoding != "utf-8" or prompts.delimiter not in (None, ",", "\t"):
        info(f"{source}: read as {prompts.encoding}" + (f", delimiter {prompts.delimiter!r}"
                                                        if prompts.delimiter not in (None, ",", "\t") else ""))
    skipping = check_prompts(prompts, source, skip_invalid=skip_invalid, fmt=out_format,
                             negative_prompt=negative_prompt)
    if skipping:
        warn(skipping)
    if prompts.ignored_fields:
        info(f"ignoring column(s)/key(s): {', '.join(prompts.ignored_fields)}")
    if dry_run:
        count = count_prompts(prompts, num_images, shard_spec)
        if json_output:
            out_json(count)
        else:
            print_line(f"{count['prompts']} prompt(s), {count['images']} image(s)"
                       + (f" in shard {count['shard']}" if shard_spec else ""))
        return
    best_of = prepare_rerank(rerank, keep_candidates, scorer, cache_dir)
    if best_of is not None:  # the resume key holds the scorer's recorded name
        options = replace(options, scorer=best_of.scorer.name)

    from dallecli.engine.generate import Engine

    engine = Engine(model or user_default("model"), user_device(shard_device(device, env_shard)),
                    dtype or user_default("dtype"), cache_dir, vae=vae, low_memory=low_memory, revision=revision,
                    backend=backend or user_default("backend"))
    for notice in engine.notices:
        info(notice)
    folder = prepare_output_folder(out or default_output_dir())
    run = BatchRun.start(engine, prompts, options, folder, source=source, shard=shard_spec, fmt=out_format,
                         overwrite=overwrite, grid_label=grid_label, stdin_data=stdin_data)
    command = shlex.join(["dalle", *sys.argv[1:]])
    if run.stdin_copy is not None:  # a resume needs the same prompts again: kept beside the manifest
        command += f" < {shlex.quote(str(run.stdin_copy))}"
    if run.negative_prompt_ignored:
        warn("a negative prompt has no effect with guidance 1 or less (classifier-free guidance needs a scale above 1)")
    where = f" (shard {shard_spec})" if shard_spec else ""
    info(f"{source}: {len(prompts.rows)} prompt(s){where}; skipped {len(run.skipped)}, generating "
         f"{len(run.pending)} image(s) into {folder} (base seed {run.base_seed})")
    if run.pending:
        report_memory_choice(run.memory())
        with loading(mode=mode):  # "loading model": a pulsing bar on a terminal, one line in a log
            run.load()
    warned = set()
    with progress_bar(run.total_steps, "generating", mode=mode) as bar:
        try:
            for outcome in run.run(on_step=lambda step, total: bar.advance(), best_of=best_of):
                for message in outcome.warnings:
                    if message not in warned:
                        warned.add(message)
                        warn(f"line {outcome.job.line}: {message}")
                if outcome.status == "failed":
                    warn(f"line {outcome.job.line} image {outcome.job.image} failed: {outcome.error}")
                elif not json_output:
                    print_line(str(outcome.path))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {run.made} image(s) finished in this run are kept in {folder} and "
                              f"recorded in {run.manifest}; the image in progress was discarded. Resume with: "
                              f"{command}") from None
    if run.unknown_words:  # once for the run, not once per prompt (a PartiPrompts run would print 1,632 lines)
        warn(engine.unknown_words_warning(run.unknown_words))
    sheets = run.write_grids()
    if len(sheets) > 1:
        info(f"every shard is done: the combined grid is {sheets[1]}")
    summary = run.summary(grid=sheets[0] if sheets else None)
    _render(summary)
    if json_output:
        out_json(summary.to_dict())
    if run.failed:
        raise DalleError(f"{run.failed} image(s) failed (recorded with \"status\": \"failed\" in "
                         f"{run.manifest}); re-run the same command to retry them: {command}")


def _render(summary) -> None:
    from rich.table import Table

    from dallecli.cli.console import err

    table = Table(title="dalle batch", show_header=False, box=None, title_justify="left")
    rows = [("images", str(summary.images)), ("skipped", str(summary.skipped)), ("failed", str(summary.failed)),
            ("wall time", f"{summary.seconds:.1f} s (+ {summary.load_seconds:.1f} s loading)"), ("images/s", f"{summary.images_per_second:.2f}"),
            ("folder", summary.folder)]
    if summary.shard:
        rows.append(("shard", summary.shard))
    if summary.grid:
        rows.append(("grid", summary.grid))
    for name, value in rows:
        table.add_row(name, value)
    err().print(table)
