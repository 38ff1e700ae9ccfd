"""Run planned jobs through one engine: forward passes, PNG writes, manifest lines, failures, a summary."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dallecli.batch.manifest import append_record, image_file
from dallecli.batch.plan import Job
from dallecli.errors import first_line

StepCallback = Callable[[int, int], None]


@dataclass
class JobOutcome:
    """What became of one job: ``status`` "done" (``path`` written) or "failed" (``error`` says why)."""

    job: Job
    status: str
    path: Path | None = None
    seconds: float | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    unknown_words: list[str] = field(default_factory=list)  # prompt words the model was not trained on


@dataclass
class BatchSummary:
    """The end of a run: images made, skipped (already done), failed; ``seconds`` is the wall time of the
    generation, ``load_seconds`` that of loading the model before it."""

    images: int
    skipped: int
    failed: int
    seconds: float
    load_seconds: float
    folder: str
    manifest: str
    base_seed: int
    shard: str | None = None
    grid: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        document = asdict(self)
        document.update(seconds=round(self.seconds, 3), load_seconds=round(self.load_seconds, 3),
                        images_per_second=round(self.images_per_second, 4))
        return document


def run_jobs(engine, batches: list[list[Job]], folder: Path, *, extra: dict | None = None,
             replace: dict[tuple, list[Path]] | None = None, on_step: StepCallback | None = None,
             fmt=None, best_of=None) -> Iterator[JobOutcome]:
    """Make the images of ``batches`` (one forward pass each), yielding each job's outcome.

    Each image is written with :func:`dallecli.images.write_image` in ``fmt`` (a
    :class:`~dallecli.images.OutputFormat`, default PNG; atomic, never overwriting; its file-name
    number is the row number, also on a name clash, which tags the name ``.2``, ``.3``, ...), then its
    manifest line is appended. A pass that raises is retried one image at
    a time, and an image that still fails is recorded as failed; the run goes on. Ctrl-C
    (``KeyboardInterrupt``) propagates: the pass in progress is discarded, finished images stay recorded.

    Args:
        engine: a :class:`~dallecli.engine.generate.Engine`.
        batches: from :func:`dallecli.batch.plan.group_batches`.
        folder: the output folder.
        extra: more fields for every manifest line (base_seed, shard, ...).
        replace: ``--overwrite``: job key -> earlier files of that image, deleted just before the new one is
            written (only files directly inside ``folder``: :func:`dallecli.batch.manifest.image_file`).
        on_step: progress callback ``(step, steps)`` after each denoising step.
        best_of: ``--rerank`` (a :class:`dallecli.scoring.rerank.BestOf`): each job's candidates
            (``Job.candidate_seeds``) are made in the same pass, the best by the scorer is written with its score
            and rank in its metadata and its manifest line's ``rerank``; with ``keep``, the others go to
            ``candidates/``.

    Raises:
        OSError: an image or the manifest cannot be written (not a row failure: the run stops).
    """
    for batch in batches:
        yield from _run_batch(engine, batch, Path(folder), extra or {}, replace or {}, on_step, fmt, best_of)


def _generate(engine, batch, on_step, best_of):
    """Per job of ``batch``: ``(GeneratedImage to write, rerank record or None, losing candidates)``."""
    request = batch[0].settings.request()
    if best_of is None:
        results = engine.generate_items([(job.prompt, job.seed) for job in batch], request, on_step=on_step)
        return [(result, None, []) for result in results]
    from dallecli.scoring.rerank import rank_group

    items = [(job.prompt, seed) for job in batch for seed in job.candidate_seeds]
    results = engine.generate_items(items, request, on_step=on_step)
    scores = best_of.scorer.score([r.image for r in results], [prompt for prompt, _ in items])
    out, start = [], 0
    for number, job in enumerate(batch):
        count = len(job.candidate_seeds)
        ranked = rank_group(results[start:start + count], scores[start:start + count], number)
        start += count
        records = [r.metadata(best_of.scorer, list(job.candidate_seeds)) for r in ranked]
        out.append((ranked[0].result, records[0],
                    list(zip((r.result for r in ranked[1:]), records[1:])) if best_of.keep else []))
    return out


def _run_batch(engine, batch, folder, extra, replace, on_step, fmt=None, best_of=None):
    from dallecli.engine.schedulers import a1111_sampler
    from dallecli.images import write_image

    start = time.perf_counter()
    try:
        made = _generate(engine, batch, on_step, best_of)
    except Exception as exc:  # noqa: BLE001 - any failure of a pass is recorded, the run goes on
        if len(batch) > 1:
            for job in batch:
                yield from _run_batch(engine, [job], folder, extra, replace, on_step, fmt, best_of)
            return
        error = first_line(exc)
        append_record(folder, {"type": "image", "status": "failed", **batch[0].fields(), **extra,
                               "error": f"{type(exc).__name__}: {error}"})
        yield JobOutcome(batch[0], "failed", error=error)
        return
    seconds = (time.perf_counter() - start) / len(batch)
    for job, (result, rerank, losers) in zip(batch, made):
        settings = result.settings.to_dict()
        for old in replace.get(job.key(), []):
            if image_file(folder, Path(old).name) == Path(old):  # never a file outside the folder
                old.unlink(missing_ok=True)
        for loser, record in losers:  # --keep-candidates
            write_image(loser.image, folder / "candidates", {**loser.settings.to_dict(), "rerank": record},
                        a1111_sampler(settings["scheduler"]), index=job.row, keep_index=True, fmt=fmt)
        if rerank:
            settings["rerank"] = rerank
        path = write_image(result.image, folder, settings, a1111_sampler(settings["scheduler"]), index=job.row,
                           keep_index=True, fmt=fmt)
        append_record(folder, {"type": "image", "status": "done", **job.fields(), **extra,
                               "scheduler": settings["scheduler"], "dtype": settings["dtype"],
                               "device": settings["device"], "path": path.name, "seconds": round(seconds, 4),
                               **({"reranked": {"winner_seed": settings["seed"], "clip_score": rerank["clip_score"],
                                              "candidate_seeds": rerank["candidate_seeds"]}} if rerank else {})})
        yield JobOutcome(job, "done", path, seconds, warnings=result.warnings,
                         unknown_words=list(result.settings.unknown_words or []))


def adopt_orphans(folder: Path, pending: list[Job], extra: dict | None = None, suffix: str = ".png"
                  ) -> tuple[list[Job], list[Job]]:
    """Find images written by an earlier run that stopped before recording them (between the PNG and its
    manifest line); record them instead of making them again.

    An orphan is the file a job would be written to (:func:`dallecli.images.image_name` with the row number
    and ``suffix``, the ``--format``'s) whose stored metadata matches the job's prompt, seed and settings.

    Returns:
        (still pending, adopted) jobs.
    """
    from dallecli.errors import UsageError
    from dallecli.images import image_name, read_metadata

    still, adopted = [], []
    for job in pending:
        if job.candidate_seeds:  # a --rerank winner's seed is not known before its candidates are scored
            still.append(job)
            continue
        path = Path(folder) / image_name(job.row, job.seed, job.prompt, suffix)
        try:
            stored = read_metadata(path) if path.is_file() else None
        except UsageError:
            stored = None
        s = job.settings
        expected = {"prompt": job.prompt, "seed": job.seed, "negative_prompt": s.negative_prompt, "steps": s.steps,
                    "guidance_scale": s.guidance_scale, "width": s.width, "height": s.height, "model": s.model}
        if s.scheduler != "default":
            expected["scheduler"] = s.scheduler
        if s.clip_skip is not None:
            expected["clip_skip"] = s.clip_skip
        inputs = {"init_image": s.init_image, "mask": s.mask}  # the same files (paths), or none
        same_input = all(((stored or {}).get(k) or {}).get("path") == (str(Path(v).resolve()) if v else None)
                         for k, v in inputs.items())
        if s.strength is not None:
            expected["strength"] = s.strength
        # the engine's part of the key: an image made with another dtype, VAE, LoRAs or revision is no orphan
        expected.update({"vae": s.vae, "model_revision": s.model_revision})
        if s.dtype is not None:
            expected["dtype"] = s.dtype
        same_input = same_input and not s.loras and not (stored or {}).get("loras")
        if stored and same_input and stored.get("source") == "dalle" and all(
                stored.get(k) == v for k, v in expected.items()):
            append_record(folder, {"type": "image", "status": "done", **job.fields(), **(extra or {}),
                                   "scheduler": stored.get("scheduler"), "dtype": stored.get("dtype"),
                                   "device": stored.get("device"), "path": path.name, "seconds": None})
            adopted.append(job)
        else:
            still.append(job)
    return still, adopted

