"""``dalle batch``: images for every prompt of a file, with one loaded model; resumable and shardable."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.errors import Interrupted, handles_errors
from dallecli.cli.options import (CacheDir, ClipSkip, Device, Dtype, Guidance, Height, ImageFormat, KeepCandidates,
                                  LowMemory, Model, NegativePrompt, Progress, Quality, Rerank, Revision, Scheduler,
                                  Scorer, Steps, Vae, Width)

MAX_LISTED = 20  # malformed rows listed before "and N more"


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
    from dallecli.batch.manifest import finished_images, manifest_path, read_records, save_stdin_copy, start_run
    from dallecli.batch.plan import (BatchOptions, engine_identity, group_batches, parse_shard, plan_jobs, shard_from_env,
                                     split_finished, validate_options)
    from dallecli.batch.prompts import STDIN_NAME, check_format, parse_prompts, read_prompt_file
    from dallecli.batch.run import BatchSummary, adopt_orphans, run_jobs
    from dallecli.cli.console import info, out as print_line, out_json, progress_bar, warn
    from dallecli.config import default_output_dir, user_default
    from dallecli.batch.grid import LABELS, grid_size
    from dallecli.batch.manifest import in_format
    from dallecli.images import check_image_size, check_metadata_room, output_format, prepare_output_folder
    from dallecli.engine.request import RANDOM_SEED
    from dallecli.engine.schedulers import validate_scheduler
    from dallecli.errors import DalleError, UsageError

    from dallecli.cli.console import loading, progress_mode
    from dallecli.cli.running import prepare_rerank, user_device
    from dallecli.config import setting_source

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
    grid = grid or grid_label is not None
    shard_spec = parse_shard(shard) if shard is not None else shard_from_env()
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
    if prompts.invalid:
        listed = "\n".join(f"  {row}" for row in prompts.invalid[:MAX_LISTED])
        more = len(prompts.invalid) - MAX_LISTED
        listed += f"\n  ... and {more} more" if more > 0 else ""
        if not skip_invalid:
            raise UsageError(f"{len(prompts.invalid)} malformed row(s) in {source}; nothing was generated. Fix them "
                             f"or pass --skip-invalid:\n{listed}")
        warn(f"skipping {len(prompts.invalid)} malformed row(s) in {source}:\n{listed}")
    if not prompts.rows:
        raise UsageError(f"{source} holds no prompts")
    if prompts.ignored_fields:
        info(f"ignoring column(s)/key(s): {', '.join(prompts.ignored_fields)}")
    for row in prompts.rows:  # a JPEG's metadata has room for 64 KB: refuse a longer prompt now, not at its turn
        check_metadata_room(out_format, row.prompt, row.settings.get("negative_prompt", negative_prompt),
                            f"line {row.line}: the prompt")
    best_of = None if dry_run else prepare_rerank(rerank, keep_candidates, scorer, cache_dir)
    if best_of is not None:  # the resume key holds the scorer's recorded name
        from dataclasses import replace as with_fields

        options = with_fields(options, scorer=best_of.scorer.name)
    if dry_run:
        rows = [row for row in prompts.rows if shard_spec is None or shard_spec.takes(row.row)]
        count = {"prompts": len(rows), "images": sum(row.settings.get("n", num_images) for row in rows),
                 "malformed": len(prompts.invalid), "shard": str(shard_spec) if shard_spec else None}
        if json_output:
            out_json(count)
        else:
            print_line(f"{count['prompts']} prompt(s), {count['images']} image(s)"
                       + (f" in shard {count['shard']}" if shard_spec else ""))
        return

    from dallecli.engine.generate import Engine, random_seed

    if shard is None and shard_spec is not None and device in (None, "auto") and os.environ.get("LOCAL_RANK", "").isdigit():
        from dallecli.engine.device import resolve_device

        if resolve_device("auto") == "cuda":  # one process per GPU under torchrun/accelerate
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    engine = Engine(model or user_default("model"), user_device(device), dtype or user_default("dtype"),
                    cache_dir, vae=vae, low_memory=low_memory, revision=revision)
    for notice in engine.notices:
        info(notice)
    folder = prepare_output_folder(out or default_output_dir())
    from dallecli import __version__

    recorded = start_run(folder, random_seed() if seed is None else seed, {"source": source, "version": __version__})
    command = shlex.join(["dalle", *sys.argv[1:]])
    if stdin_data is not None:  # a resume needs the same prompts again: keep them beside the manifest
        command += f" < {shlex.quote(str(save_stdin_copy(folder, stdin_data, prompts.format)))}"
    base_seed = seed if seed is not None else recorded
    jobs = plan_jobs(prompts.rows, options, engine.defaults(), engine.model.name, base_seed, shard_spec,
                     identity=engine_identity(engine))
    for size in sorted({(job.settings.width, job.settings.height) for job in jobs}):  # before any image is made
        check_image_size(out_format, *size)
    all_jobs = jobs if shard_spec is None or not grid else plan_jobs(
        prompts.rows, options, engine.defaults(), engine.model.name, base_seed, None, identity=engine_identity(engine))
    if grid:  # the combined grid of every shard is the largest
        check_image_size(out_format, *grid_size(len(all_jobs), labelled=grid_label not in (None, "none")), "the grid")
    for task in sorted({job.settings.request().resolved_task for job in jobs} - {"txt2img"}):
        engine.check_task(task)  # "MODEL cannot do edit" before the model loads
    extra = {"base_seed": base_seed, "shard": str(shard_spec) if shard_spec else None}
    everything = finished_images(folder, read_records(folder))
    finished = in_format(everything, out_format.suffix)  # a re-run in another --format makes its images again
    if overwrite:
        pending, skipped, replace = jobs, [], everything
    else:
        pending, skipped = split_finished(jobs, finished)
        pending, adopted = adopt_orphans(folder, pending, extra, out_format.suffix)
        skipped, replace = skipped + adopted, {}
    if any(job.settings.negative_prompt and job.settings.guidance_scale <= 1 for job in pending):
        warn("a negative prompt has no effect with guidance 1 or less (classifier-free guidance needs a scale above 1)")
    where = f" (shard {shard_spec})" if shard_spec else ""
    info(f"{source}: {len(prompts.rows)} prompt(s){where}; skipped {len(skipped)}, generating {len(pending)} "
         f"image(s) into {folder} (base seed {base_seed})")

    # a pass holds about --batch-size images: with --rerank K, that many candidates
    batches = group_batches(pending, max(1, options.batch_size // (options.rerank or 1)))
    made, failed, warned = 0, 0, set()
    load_started = time.perf_counter()
    if batches:
        from dallecli.cli.console import report_memory_choice

        first = batches[0][0].settings
        report_memory_choice(engine.memory(first.width, first.height, len(batches[0]), first.guidance_scale > 1))
        with loading(mode=mode):  # "loading model": a pulsing bar on a terminal, one line in a log
            engine.pipe  # load once, outside the timed generation  # noqa: B018
        engine.check_clip_skip(options.clip_skip)  # a usage error (exit 2), not a failure of every row
    load_seconds = time.perf_counter() - load_started
    started = time.perf_counter()
    unknown: dict[str, None] = {}  # words the model does not know, in the order they appeared
    from dallecli.engine.request import effective_steps

    defaults = engine.defaults()
    with progress_bar(sum(effective_steps(b[0].settings.request().with_defaults(defaults)) for b in batches),
                       "generating", mode=mode) as bar:
        try:
            for outcome in run_jobs(engine, batches, folder, extra=extra, replace=replace, fmt=out_format,
                                    on_step=lambda step, total: bar.advance(), best_of=best_of):
                for message in outcome.warnings:
                    if message not in warned:
                        warned.add(message)
                        warn(f"line {outcome.job.line}: {message}")
                unknown.update(dict.fromkeys(outcome.unknown_words))
                if outcome.status == "failed":
                    failed += 1
                    warn(f"line {outcome.job.line} image {outcome.job.image} failed: {outcome.error}")
                    continue
                made += 1
                if not json_output:
                    print_line(str(outcome.path))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {made} image(s) finished in this run are kept in {folder} and recorded "
                              f"in {manifest_path(folder)}; the image in progress was discarded. Resume with: "
                              f"{command}") from None
    if unknown:  # once for the run, not once per prompt (a PartiPrompts run would print 1,632 lines)
        warn(engine.unknown_words_warning(unknown))
    summary = BatchSummary(images=made, skipped=len(skipped), failed=failed, seconds=time.perf_counter() - started,
                           load_seconds=load_seconds, folder=str(folder), manifest=str(manifest_path(folder)), base_seed=base_seed,
                           shard=str(shard_spec) if shard_spec else None)
    if grid:
        sheets = _write_grid(folder, jobs, all_jobs, shard_spec, out_format, grid_label or "none")
        summary.grid = str(sheets[0]) if sheets else None
        if len(sheets) > 1:
            info(f"every shard is done: the combined grid is {sheets[1]}")
    _render(summary)
    if json_output:
        out_json(summary.to_dict())
    if failed:
        raise DalleError(f"{failed} image(s) failed (recorded with \"status\": \"failed\" in "
                         f"{manifest_path(folder)}); re-run the same command to retry them: {command}")


def _write_grid(folder: Path, jobs, all_jobs, shard_spec, out_format, label: str) -> list[Path]:
    from dallecli.batch.grid import write_run_grids
    from dallecli.batch.manifest import finished_images, in_format, read_records

    finished = in_format(finished_images(folder, read_records(folder)), out_format.suffix)
    return write_run_grids(folder, jobs, all_jobs, finished, shard=shard_spec, fmt=out_format, label=label)


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
