"""One ``dalle batch`` run below the CLI: check the prompts, plan this shard's jobs against what the manifest
already holds (resume, ``--overwrite``, orphans), run them through one engine, write the grids, sum it up.
Nothing here prints: notes and warnings come back as values, so a library user runs a file the way the CLI
does::

    prompts = read_prompt_file(Path("prompts.csv"))
    check_prompts(prompts, "prompts.csv")                       # UsageError for malformed rows
    engine = Engine("sd-turbo")
    run = BatchRun.start(engine, prompts, BatchOptions(n=2), Path("out"), source="prompts.csv")
    run.load()
    for outcome in run.run():                                   # JobOutcome: "done" (path) or "failed"
        ...
    summary = run.summary()

Re-running the same call resumes: images the manifest records as done (or left unrecorded by an interrupted
run, :func:`dallecli.batch.run.adopt_orphans`) are skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dallecli.batch.manifest import (finished_images, in_format, manifest_path, read_records, recorded_seed,
                                     save_stdin_copy, start_run)
from dallecli.batch.plan import (BatchOptions, Job, Shard, engine_identity, group_batches, plan_jobs,
                                 split_finished)
from dallecli.batch.prompts import PromptFile
from dallecli.batch.run import BatchSummary, JobOutcome, StepCallback, adopt_orphans, run_jobs
from dallecli.errors import UsageError

MAX_LISTED = 20  # malformed rows listed in a message before "and N more"


def check_prompts(prompts: PromptFile, source: str, *, skip_invalid: bool = False, fmt=None,
                  negative_prompt: str | None = None) -> str | None:
    """Check a parsed prompt file before any model loads.

    Args:
        prompts: from :func:`dallecli.batch.prompts.read_prompt_file` or :func:`~dallecli.batch.prompts.parse_prompts`.
        source: how messages name the file ("stdin" for a pipe).
        skip_invalid: skip malformed rows instead of refusing the file (``--skip-invalid``).
        fmt: the output :class:`dallecli.images.OutputFormat` (default PNG): a JPEG's metadata has room for
            64 KB, so a longer prompt is refused now, not at its turn.
        negative_prompt: the ``--negative-prompt`` of rows that set none.

    Returns:
        With ``skip_invalid``, the warning that lists the malformed rows skipped; else (or with none) None.

    Raises:
        UsageError: malformed rows without ``skip_invalid`` (at most :data:`MAX_LISTED` listed), no valid row,
            or a prompt too long for ``fmt``'s metadata (its line named).
    """
    from dallecli.images import PNG, check_metadata_room

    skipped = None
    if prompts.invalid:
        listed = "\n".join(f"  {row}" for row in prompts.invalid[:MAX_LISTED])
        more = len(prompts.invalid) - MAX_LISTED
        listed += f"\n  ... and {more} more" if more > 0 else ""
        if not skip_invalid:
            raise UsageError(f"{len(prompts.invalid)} malformed row(s) in {source}; nothing was generated. Fix them "
                             f"or pass --skip-invalid:\n{listed}")
        skipped = f"skipping {len(prompts.invalid)} malformed row(s) in {source}:\n{listed}"
    if not prompts.rows:
        raise UsageError(f"{source} holds no prompts")
    for row in prompts.rows:
        check_metadata_room(fmt or PNG, row.prompt, row.settings.get("negative_prompt", negative_prompt),
                            f"line {row.line}: the prompt")
    return skipped


def count_prompts(prompts: PromptFile, n: int = 1, shard: Shard | None = None) -> dict:
    """What a run of ``prompts`` would make (``--dry-run``; nothing loads): ``{"prompts", "images", "malformed",
    "shard"}``: the valid rows of ``shard`` (all without one), their images (a row's ``n``, else ``n``), the
    malformed rows of the whole file, and the shard as "I/N" (None)."""
    rows = [row for row in prompts.rows if shard is None or shard.takes(row.row)]
    return {"prompts": len(rows), "images": sum(row.settings.get("n", n) for row in rows),
            "malformed": len(prompts.invalid), "shard": str(shard) if shard else None}


def shard_device(device: str | None, shard: Shard | None, environ=None) -> str | None:
    """The device of a shard started by ``torchrun``/``accelerate launch`` (``LOCAL_RANK`` set) with no
    device or "auto" on a CUDA machine: ``cuda:LOCAL_RANK``, one process per GPU; else ``device`` unchanged.

    Args:
        device: ``--device`` (None: not given).
        shard: the shard taken from the environment (:func:`dallecli.batch.plan.shard_from_env`); None when
            ``--shard`` was given or the process is not one of several.
        environ: the environment (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    if shard is None or device not in (None, "auto") or not environ.get("LOCAL_RANK", "").isdigit():
        return device
    from dallecli.engine.device import resolve_device

    return f"cuda:{environ['LOCAL_RANK']}" if resolve_device("auto") == "cuda" else device


@dataclass
class BatchRun:
    """A planned batch run of one engine into one folder: its jobs, which are pending and what became of them.

    Made by :meth:`start`; then :meth:`load`, :meth:`run`, :meth:`write_grids` and :meth:`summary`.

    Attributes:
        engine: the :class:`~dallecli.engine.generate.Engine`.
        folder: the output folder (its ``manifest.jsonl`` records every image).
        source: how the prompt file is named in the manifest and messages.
        options: the command-line settings.
        fmt: the output :class:`dallecli.images.OutputFormat`.
        base_seed: the base seed in force (the manifest's: every shard and resume shares it).
        shard: this process's shard, or None.
        jobs: this shard's jobs; ``all_jobs``: every shard's (for the combined grid).
        pending: jobs to make now, in file order; ``skipped``: already finished (or adopted).
        replace: with ``overwrite``, job key -> earlier files deleted when the image is made again.
        grid_label: None for no grid, else one of :data:`dallecli.batch.grid.LABELS`.
        stdin_copy: where prompts read from stdin were kept (a resume feeds them again), or None.
        made, failed: images made and failed so far by :meth:`run`.
        unknown_words: prompt words the model does not know, in the order they appeared.
        load_seconds, seconds: wall time of :meth:`load` and of :meth:`run`.
    """

    engine: object
    folder: Path
    source: str
    options: BatchOptions
    fmt: object
    base_seed: int
    shard: Shard | None
    jobs: list[Job]
    all_jobs: list[Job]
    pending: list[Job]
    skipped: list[Job]
    replace: dict
    grid_label: str | None = None
    stdin_copy: Path | None = None
    made: int = 0
    failed: int = 0
    unknown_words: dict[str, None] = field(default_factory=dict)
    load_seconds: float = 0.0
    seconds: float = 0.0

    @classmethod
    def start(cls, engine, prompts: PromptFile, options: BatchOptions, folder: Path, *, source: str,
              shard: Shard | None = None, fmt=None, overwrite: bool = False, grid_label: str | None = None,
              stdin_data: bytes | None = None) -> BatchRun:
        """Start (or resume) a run: plan this shard's jobs, check them against the model before it loads, then
        (only once every check passed) record the run in the manifest, and split the jobs into pending and
        finished.

        Args:
            engine: an :class:`~dallecli.engine.generate.Engine` (not loaded: nothing here loads it).
            prompts: the checked prompt file (:func:`check_prompts`).
            options: the command-line settings (:func:`dallecli.batch.plan.validate_options` passed); a base
                seed of None draws one, unless the manifest already holds one.
            folder: the output folder (created once every check has passed; untouched on a UsageError).
            source: how the manifest names the prompt file.
            shard: take only this shard's rows.
            fmt: the output :class:`dallecli.images.OutputFormat` (default PNG); images finished in another
                format are made again.
            overwrite: make every image again, replacing the finished ones.
            grid_label: None for no grid, else "none", "prompt" or "seed" (checked here: the combined grid of
                every shard must fit the format).
            stdin_data: the prompts' bytes when read from stdin, kept in ``folder`` for a resume.

        Returns:
            The :class:`BatchRun`.

        Raises:
            UsageError: an image or the grid too large for ``fmt``, a row's task, ``--steps`` that its
                scheduler cannot plan (:meth:`~dallecli.engine.generate.Engine.check_scheduler`), a
                ``--clip-skip`` the model cannot apply; a row's init image that cannot be read.
            DiskFullError, OSError: the manifest cannot be written.
        """
        from dallecli import __version__
        from dallecli.batch.grid import grid_size
        from dallecli.engine.generate import random_seed
        from dallecli.images import PNG, check_image_size

        fmt = fmt or PNG
        folder = Path(folder)
        engine.check_clip_skip(options.clip_skip)
        # every check needs the jobs and no weights, and comes before anything is written: a usage error leaves
        # a new folder uncreated and a resumed one as it was. The base seed in force is the manifest's (read
        # only here) unless --seed is given
        seed = options.seed
        base_seed = seed if seed is not None else recorded_seed(folder)
        base_seed = random_seed() if base_seed is None else base_seed
        identity = engine_identity(engine)

        def plan(base_seed: int) -> tuple[list[Job], list[Job]]:  # this shard's jobs, and every shard's
            jobs = plan_jobs(prompts.rows, options, engine.defaults(), engine.model.name, base_seed, shard,
                             identity=identity)
            return jobs, jobs if shard is None or grid_label is None else plan_jobs(
                prompts.rows, options, engine.defaults(), engine.model.name, base_seed, None, identity=identity)

        jobs, all_jobs = plan(base_seed)
        for size in sorted({(job.settings.width, job.settings.height) for job in jobs}):  # before any image is made
            check_image_size(fmt, *size)
        if grid_label is not None:  # the combined grid of every shard is the largest
            check_image_size(fmt, *grid_size(len(all_jobs), labelled=grid_label != "none"), "the grid")
        settings = list(dict.fromkeys(job.settings for job in jobs))
        for task in sorted({s.request().resolved_task for s in settings} - {"txt2img"}):
            engine.check_task(task)  # "MODEL cannot do edit" before the model loads
        for each in settings:  # a usage error before loading, not a failed row each
            engine.check_scheduler(each.request().scheduler, each.steps)
        recorded = start_run(folder, base_seed, {"source": source, "version": __version__})
        if seed is None and recorded != base_seed:  # another shard created the manifest since it was read
            base_seed = recorded
            jobs, all_jobs = plan(base_seed)
        stdin_copy = save_stdin_copy(folder, stdin_data, prompts.format) if stdin_data is not None else None
        everything = finished_images(folder, read_records(folder))
        if overwrite:
            pending, skipped, replace_files = jobs, [], everything
        else:
            # a re-run in another --format makes its images again
            pending, skipped = split_finished(jobs, in_format(everything, fmt.suffix))
            pending, adopted = adopt_orphans(folder, pending, _extra(base_seed, shard), fmt.suffix)
            skipped, replace_files = skipped + adopted, {}
        return cls(engine, folder, source, options, fmt, base_seed, shard, jobs, all_jobs, pending, skipped,
                   replace_files, grid_label, stdin_copy)

    @property
    def manifest(self) -> Path:
        """The run's ``manifest.jsonl``."""
        return manifest_path(self.folder)

    @property
    def batches(self) -> list[list[Job]]:
        """The pending jobs cut into forward passes of about ``options.batch_size`` images (with ``--rerank K``,
        that many candidates: batch_size // K jobs)."""
        return group_batches(self.pending, max(1, self.options.batch_size // (self.options.rerank or 1)))

    @property
    def total_steps(self) -> int:
        """The denoising steps of every pass, as :meth:`run`'s ``on_step`` counts them."""
        from dallecli.engine.request import effective_steps

        defaults = self.engine.defaults()
        return sum(effective_steps(batch[0].settings.request().with_defaults(defaults)) for batch in self.batches)

    @property
    def negative_prompt_ignored(self) -> bool:
        """Whether a pending job has a negative prompt that its guidance (1 or less) ignores."""
        return any(job.settings.negative_prompt and job.settings.guidance_scale <= 1 for job in self.pending)

    def memory(self):
        """The engine's :class:`~dallecli.engine.memory.MemoryChoice` for the first pass (decided before the
        model loads; the pipeline loads in that mode), or None when nothing is pending.

        Raises:
            UsageError: a pass that even low-memory mode cannot fit (see :meth:`Engine.memory`).
        """
        if not self.pending:
            return None
        first = self.batches[0]
        settings = first[0].settings
        return self.engine.memory(settings.width, settings.height, len(first), settings.guidance_scale > 1)

    def load(self) -> None:
        """Load the model when anything is pending (once, outside the timed generation), timed in
        :attr:`load_seconds`.

        Raises:
            DalleError: see :attr:`Engine.pipe`.
        """
        started = time.perf_counter()
        if self.pending:
            self.engine.pipe  # noqa: B018
        self.load_seconds = time.perf_counter() - started

    def run(self, on_step: StepCallback | None = None, best_of=None) -> Iterator[JobOutcome]:
        """Make the pending images (:func:`dallecli.batch.run.run_jobs`), yielding each job's outcome and
        counting :attr:`made`, :attr:`failed` and :attr:`unknown_words`; its wall time goes to :attr:`seconds`.

        Args:
            on_step: progress callback ``(step, steps)`` after each denoising step (:attr:`total_steps` in all).
            best_of: ``--rerank``: a :class:`dallecli.scoring.rerank.BestOf`.

        Raises:
            KeyboardInterrupt: the pass in progress is discarded, finished images stay recorded.
            OSError: an image or the manifest cannot be written.
        """
        started = time.perf_counter()
        try:
            for outcome in run_jobs(self.engine, self.batches, self.folder, extra=_extra(self.base_seed, self.shard),
                                    replace=self.replace, fmt=self.fmt, on_step=on_step, best_of=best_of):
                self.unknown_words.update(dict.fromkeys(outcome.unknown_words))
                if outcome.status == "failed":
                    self.failed += 1
                else:
                    self.made += 1
                yield outcome
        finally:
            self.seconds += time.perf_counter() - started

    def write_grids(self) -> list[Path]:
        """The contact sheets of the finished images (:func:`dallecli.batch.grid.write_run_grids`): this shard's,
        then the combined one once every shard is done; none without ``grid_label``.

        Raises:
            DiskFullError, OSError: a sheet cannot be written.
        """
        if self.grid_label is None:
            return []
        from dallecli.batch.grid import write_run_grids

        finished = in_format(finished_images(self.folder, read_records(self.folder)), self.fmt.suffix)
        return write_run_grids(self.folder, self.jobs, self.all_jobs, finished, shard=self.shard, fmt=self.fmt,
                               label=self.grid_label)

    def summary(self, grid: Path | None = None) -> BatchSummary:
        """The run so far as a :class:`~dallecli.batch.run.BatchSummary` (``grid``: the sheet written, if any)."""
        return BatchSummary(images=self.made, skipped=len(self.skipped), failed=self.failed, seconds=self.seconds,
                            load_seconds=self.load_seconds, folder=str(self.folder), manifest=str(self.manifest),
                            base_seed=self.base_seed, shard=str(self.shard) if self.shard else None,
                            grid=str(grid) if grid else None)


def _extra(base_seed: int, shard: Shard | None) -> dict:
    """The run's fields on every manifest line."""
    return {"base_seed": base_seed, "shard": str(shard) if shard else None}

