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
from dallecli.cli.options import (CacheDir, ClipSkip, Device, Dtype, Guidance, Height, LowMemory, Model, NegativePrompt,
                                  Revision, Scheduler, Steps, Vae, Width)

MAX_LISTED = 20  # malformed rows listed before "and N more"


@handles_errors
def batch(
    file: Annotated[Path, typer.Argument(help="Prompt file: .txt (one prompt a line), .csv/.tsv (a 'prompt' column) or .jsonl.", show_default=False)],
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
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Skip malformed rows instead of stopping before generating.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Make every image again, replacing the ones already finished.")] = False,
    shard: Annotated[Optional[str], typer.Option(help="I/N: take rows r with r mod N == I (default: RANK/WORLD_SIZE under torchrun/accelerate).")] = None,
    grid: Annotated[bool, typer.Option("--grid", help="Also write a contact sheet of the finished images (grid.png).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the file and print how many prompts and images it holds; load no model.")] = False,
) -> None:
    """Generate images for every prompt in a file; re-run the same command to resume."""
    from dallecli.batch.manifest import finished_images, manifest_path, read_records, start_run
    from dallecli.batch.plan import (BatchOptions, engine_identity, group_batches, parse_shard, plan_jobs, shard_from_env,
                                     split_finished, validate_options)
    from dallecli.batch.prompts import read_prompt_file
    from dallecli.batch.run import BatchSummary, adopt_orphans, run_jobs
    from dallecli.cli.console import info, out as print_line, out_json, progress_bar, warn
    from dallecli.config import default_output_dir, user_default
    from dallecli.images import prepare_output_folder
    from dallecli.engine.request import RANDOM_SEED
    from dallecli.engine.schedulers import validate_scheduler
    from dallecli.errors import DalleError, UsageError

    scheduler = scheduler or user_default("scheduler")
    seed = None if seed == RANDOM_SEED else seed  # A1111's "random"
    options = BatchOptions(n=num_images, seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                           negative_prompt=negative_prompt or None, scheduler=scheduler, batch_size=batch_size,
                           clip_skip=clip_skip if clip_skip != 1 else None)
    validate_options(options)  # before anything loads
    validate_scheduler(scheduler)
    shard_spec = parse_shard(shard) if shard is not None else shard_from_env()
    prompts = read_prompt_file(file)
    if prompts.invalid:
        listed = "\n".join(f"  {row}" for row in prompts.invalid[:MAX_LISTED])
        more = len(prompts.invalid) - MAX_LISTED
        listed += f"\n  ... and {more} more" if more > 0 else ""
        if not skip_invalid:
            raise UsageError(f"{len(prompts.invalid)} malformed row(s) in {file}; nothing was generated. Fix them "
                             f"or pass --skip-invalid:\n{listed}")
        warn(f"skipping {len(prompts.invalid)} malformed row(s) in {file}:\n{listed}")
    if not prompts.rows:
        raise UsageError(f"{file} holds no prompts")
    if prompts.ignored_fields:
        info(f"ignoring column(s)/key(s): {', '.join(prompts.ignored_fields)}")
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
    engine = Engine(model or user_default("model"), device or user_default("device"), dtype or user_default("dtype"),
                    cache_dir, vae=vae, low_memory=low_memory, revision=revision)
    for notice in engine.notices:
        info(notice)
    folder = prepare_output_folder(out or default_output_dir())
    from dallecli import __version__

    recorded = start_run(folder, random_seed() if seed is None else seed, {"source": str(file), "version": __version__})
    base_seed = seed if seed is not None else recorded
    jobs = plan_jobs(prompts.rows, options, engine.defaults(), engine.model.name, base_seed, shard_spec,
                     identity=engine_identity(engine))
    for task in sorted({job.settings.request().resolved_task for job in jobs} - {"txt2img"}):
        engine.check_task(task)  # "MODEL cannot do edit" before the model loads
    extra = {"base_seed": base_seed, "shard": str(shard_spec) if shard_spec else None}
    finished = finished_images(folder, read_records(folder))
    if overwrite:
        pending, skipped, replace = jobs, [], finished
    else:
        pending, skipped = split_finished(jobs, finished)
        pending, adopted = adopt_orphans(folder, pending, extra)
        skipped, replace = skipped + adopted, {}
    if any(job.settings.negative_prompt and job.settings.guidance_scale <= 1 for job in pending):
        warn("a negative prompt has no effect with guidance 1 or less (classifier-free guidance needs a scale above 1)")
    where = f" (shard {shard_spec})" if shard_spec else ""
    info(f"{file}: {len(prompts.rows)} prompt(s){where}; skipped {len(skipped)}, generating {len(pending)} "
         f"image(s) into {folder} (base seed {base_seed})")

    batches = group_batches(pending, options.batch_size)
    made, failed, warned = 0, 0, set()
    load_started = time.perf_counter()
    if batches:
        from dallecli.cli.console import report_memory_choice

        first = batches[0][0].settings
        report_memory_choice(engine.memory(first.width, first.height, len(batches[0]), first.guidance_scale > 1))
        engine.pipe  # load once, outside the timed generation  # noqa: B018
        engine.check_clip_skip(options.clip_skip)  # a usage error (exit 2), not a failure of every row
    load_seconds = time.perf_counter() - load_started
    started = time.perf_counter()
    unknown: dict[str, None] = {}  # words the model does not know, in the order they appeared
    from dallecli.engine.request import effective_steps

    defaults = engine.defaults()
    with progress_bar(sum(effective_steps(b[0].settings.request().with_defaults(defaults)) for b in batches),
                       "generating") as bar:
        try:
            for outcome in run_jobs(engine, batches, folder, extra=extra, replace=replace,
                                    on_step=lambda step, total: bar.advance()):
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
            command = shlex.join(["dalle", *sys.argv[1:]])
            raise Interrupted(f"interrupted: {made} image(s) finished in this run are kept in {folder} and recorded "
                              f"in {manifest_path(folder)}; the image in progress was discarded. Resume with: "
                              f"{command}") from None
    if unknown:  # once for the run, not once per prompt (a PartiPrompts run would print 1,632 lines)
        warn(engine.unknown_words_warning(unknown))
    summary = BatchSummary(images=made, skipped=len(skipped), failed=failed, seconds=time.perf_counter() - started,
                           load_seconds=load_seconds, folder=str(folder), manifest=str(manifest_path(folder)), base_seed=base_seed,
                           shard=str(shard_spec) if shard_spec else None)
    if grid:
        sheet = _write_grid(folder, jobs, shard_spec)
        summary.grid = str(sheet) if sheet else None
    _render(summary)
    if json_output:
        out_json(summary.to_dict())
    if failed:
        raise DalleError(f"{failed} image(s) failed (recorded with \"status\": \"failed\" in "
                         f"{manifest_path(folder)}); re-run the same command to retry them")


def _write_grid(folder: Path, jobs, shard_spec) -> Path | None:
    from dallecli.batch.grid import contact_sheet
    from dallecli.batch.manifest import finished_images, read_records

    finished = finished_images(folder, read_records(folder))
    paths = [finished[job.key()][-1] for job in jobs if job.key() in finished]
    name = f"grid-{shard_spec.index}-of-{shard_spec.count}.png" if shard_spec else "grid.png"
    return contact_sheet(paths, Path(folder) / name) if paths else None


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
