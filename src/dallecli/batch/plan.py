"""Turn prompt rows into (row, image) jobs: settings, seeds, shards, resume and grouping into forward passes.

Seeds: with a base seed B (``--seed``, or drawn once and kept in the manifest's first line), image i of row r
gets ``(B + 1000 * r + i) mod 2**32``; a row with its own ``seed`` S gets ``(S + i) mod 2**32`` (as
``dalle generate --seed S -n N`` does). A row makes at most 1000 images, so no two images of a file share a
seed unless rows set their own. The seed depends on nothing else: not on ``--batch-size``, the shard, the
order of work or what is already done. With ``--rerank K``, image i's K candidates take the seeds that images
i*K .. i*K+K-1 would have (the job's, and the resume key's, ``seed`` is the first); the winner records its own.

Shards: ``--shard I/N`` (or ``RANK``/``WORLD_SIZE`` from torchrun/accelerate) takes the rows r with
r mod N == I; every process parses and validates the whole file, so they all agree on row numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from dallecli.batch.prompts import MAX_IMAGES_PER_ROW, PromptRow
from dallecli.engine.request import MAX_SEED, GenerationRequest, validate_request
from dallecli.errors import UsageError

SEED_STRIDE = MAX_IMAGES_PER_ROW
DEFAULT_BATCH_SIZE = 4
# the fields that identify a finished image in the manifest (a job with the same values is not redone);
# "requested_scheduler" is the --scheduler value ("default": the model's own), known before the model loads;
# the manifest's "scheduler" is the one that ran (dallecli.batch.manifest)
KEY_FIELDS = ("row", "image", "prompt", "seed", "negative_prompt", "steps", "guidance_scale", "width", "height",
              "model", "requested_scheduler", "clip_skip", "init_image", "mask", "strength",
              "dtype", "vae", "loras", "model_revision", "rerank", "scorer")
# the fields a manifest written before #18 lacks (dtype was already recorded): see manifest.finished_images
ADDED_KEY_FIELDS = ("vae", "loras", "model_revision")


def image_seed(base_seed: int, row: int, image: int, row_seed: int | None = None) -> int:
    """The seed of image ``image`` of row ``row`` (both 0-based).

    ``(row_seed + image) mod 2**32`` when the row sets its own seed, else
    ``(base_seed + 1000 * row + image) mod 2**32``.
    """
    if row_seed is not None:
        return (row_seed + image) % (MAX_SEED + 1)
    return (base_seed + SEED_STRIDE * row + image) % (MAX_SEED + 1)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count): the rows r with r mod count == index."""

    index: int
    count: int

    def takes(self, row: int) -> bool:
        return row % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """Parse ``--shard I/N``.

    Raises:
        UsageError: not two whole numbers ``I/N`` with 0 <= I < N.
    """
    index, sep, count = text.strip().partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise UsageError(f"--shard '{text}' must look like I/N, e.g. 0/4 (shard I of N, counting from 0)")
    index, count = int(index), int(count)
    if count < 1 or index >= count:
        raise UsageError(f"--shard {text}: I must be between 0 and N-1 (got I={index}, N={count})")
    return Shard(index, count)


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard of a process started by ``torchrun`` or ``accelerate launch`` (``RANK`` of ``WORLD_SIZE``);
    None when ``WORLD_SIZE`` is unset or 1.

    Raises:
        UsageError: RANK/WORLD_SIZE that are not whole numbers with 0 <= RANK < WORLD_SIZE.
    """
    environ = os.environ if environ is None else environ
    world = environ.get("WORLD_SIZE", "").strip()
    if not world or world == "1":
        return None
    rank = environ.get("RANK", "").strip()
    try:
        return parse_shard(f"{rank}/{world}")
    except UsageError:
        raise UsageError(f"RANK={rank!r} WORLD_SIZE={world!r} from the environment do not form a shard; "
                         "pass --shard I/N") from None


@dataclass(frozen=True)
class BatchOptions:
    """Command-line settings, the defaults for every row (a row's own values override them).

    ``None`` fields take the model's defaults. ``n`` images per row, ``seed`` the base seed (see
    :func:`image_seed`), ``batch_size`` images per forward pass.
    """

    n: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    clip_skip: int | None = None  # AUTOMATIC1111 numbering; None (or 1) skips nothing
    rerank: int | None = None  # --rerank K: each image the best of K candidates; None: no reranking
    scorer: str | None = None  # the scorer's name with --rerank (None: the embedded one)


def validate_options(options: BatchOptions) -> None:
    """Check the command-line settings before anything loads.

    Raises:
        UsageError: a value out of range (the message names the option).
    """
    validate_request(GenerationRequest(
        prompt="-", negative_prompt=options.negative_prompt, num_images=options.n, steps=options.steps,
        guidance_scale=options.guidance, width=options.width, height=options.height, batch_size=options.batch_size,
        clip_skip=options.clip_skip,
    ))
    if options.n > MAX_IMAGES_PER_ROW:
        raise UsageError(f"-n/--num-images is at most {MAX_IMAGES_PER_ROW} per row in dalle batch (got {options.n})")
    if options.rerank is not None:
        from dallecli.scoring.rerank import check_candidates

        check_candidates(options.rerank)
        if options.n * options.rerank > MAX_IMAGES_PER_ROW:
            raise UsageError(f"-n x --rerank is at most {MAX_IMAGES_PER_ROW} candidates per row in dalle batch "
                             f"(got {options.n} x {options.rerank})")
    if options.seed is not None and not 0 <= options.seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED} (got {options.seed})")


@dataclass(frozen=True)
class Settings:
    """What images of one forward pass share (everything but prompt and seed)."""

    negative_prompt: str | None
    steps: int
    guidance_scale: float
    width: int
    height: int
    model: str
    scheduler: str  # the --scheduler name, "default" for the model's own
    clip_skip: int | None = None  # AUTOMATIC1111 numbering, >= 2; None skips nothing
    init_image: str | None = None  # absolute path of the row's init image (image to image; with mask: inpainting)
    mask: str | None = None  # absolute path of the row's mask (white = repaint)
    strength: float | None = None  # the row's denoising strength; None: the task's default
    # the engine's, the same for every job of a run (engine_identity); part of the resume key
    dtype: str | None = None  # the resolved dtype ("float32", ...)
    vae: str | None = None  # the replacement VAE's name (--vae); None for the model's own
    loras: tuple[tuple[str, float], ...] = ()  # (path or registry name, scale) of each LoRA applied
    model_revision: str | None = None  # the model's resolved revision (Hub commit, dallecli-VERSION, sha256:...)
    rerank: int | None = None  # --rerank K (None: none); with the scorer's name, part of the resume key
    scorer: str | None = None  # the scorer's recorded name with --rerank

    def request(self) -> GenerationRequest:
        """These settings as a request for :meth:`~dallecli.engine.generate.Engine.generate_items`."""
        from dallecli.engine.request import LoraSpec

        return GenerationRequest(
            prompt="-", negative_prompt=self.negative_prompt, steps=self.steps, guidance_scale=self.guidance_scale,
            width=self.width, height=self.height, scheduler=None if self.scheduler == "default" else self.scheduler,
            clip_skip=self.clip_skip, image=self.init_image, mask=self.mask, strength=self.strength,
            loras=tuple(LoraSpec(path, scale) for path, scale in self.loras),
        )


def engine_identity(engine, loras: Iterable = ()) -> dict:
    """The resume-key fields an engine fixes for every image of a run: resolved dtype, ``--vae`` name, LoRAs
    (``LoraSpec``) and model revision, as :func:`plan_jobs` takes them (nothing loads)."""
    return {"dtype": engine.image_dtype, "vae": engine.vae.name if engine.vae is not None else None,
            "loras": tuple((str(spec.path), float(spec.scale)) for spec in loras),
            "model_revision": engine.model.revision}


@dataclass(frozen=True)
class Job:
    """One image to make: image ``image`` (0-based) of row ``row``, from ``line`` of the file."""

    row: int
    line: int
    image: int
    prompt: str
    seed: int
    settings: Settings
    candidate_seeds: tuple[int, ...] = ()  # with --rerank K: the K candidates' seeds (``seed`` is the first)

    def fields(self) -> dict:
        """The job as flat manifest fields (row, line, image, prompt, seed and the settings); the settings'
        ``scheduler`` (what ``--scheduler`` asked for) is ``requested_scheduler``, and ``scheduler`` is None
        until the image is made (the manifest then records the scheduler that ran)."""
        settings = asdict(self.settings)
        return {"row": self.row, "line": self.line, "image": self.image, "prompt": self.prompt, "seed": self.seed,
                **settings, "scheduler": None, "requested_scheduler": settings["scheduler"]}

    def key(self) -> tuple:
        """What identifies this image in the manifest (:data:`KEY_FIELDS`)."""
        return record_key(self.fields())


def record_key(record: Mapping) -> tuple:
    """The :data:`KEY_FIELDS` of a manifest record (or of :meth:`Job.fields`), comparable with :meth:`Job.key`.
    Any JSON value gives a key (a hand-edited line never crashes a resume; it just matches no job)."""
    def value(name):
        found = record.get(name)
        if name == "requested_scheduler" and name not in record:  # a manifest written before #19
            found = record.get("scheduler")  # then held the --scheduler value ("default"); "sampler" what ran
        if name == "guidance_scale" and isinstance(found, (int, float)) and not isinstance(found, bool):
            return float(found)
        if isinstance(found, (list, tuple, dict)):  # loras (tuples in a job, lists once read back), or junk
            return json.dumps(found, sort_keys=True)
        return found

    return tuple(value(name) for name in KEY_FIELDS)


def plan_jobs(rows: Iterable[PromptRow], options: BatchOptions, model_defaults: Mapping, model: str,
              base_seed: int, shard: Shard | None = None, identity: Mapping | None = None) -> list[Job]:
    """Every (row, image) job of this shard, in file order, with its settings and seed fixed.

    Args:
        rows: the valid rows of the prompt file.
        options: the command-line settings; a row's own settings override them.
        model_defaults: ``{"steps", "guidance", "width", "height"}`` of the model (Engine.defaults()).
        model: the model name recorded with each image.
        base_seed: see :func:`image_seed`.
        shard: take only this shard's rows (None: all rows).
        identity: the engine's dtype, vae, loras and model_revision (:func:`engine_identity`), recorded with
            each job and part of its resume key.

    Returns:
        The jobs; image sizes in pixels (a row with an init image and no size takes the image's, rounded to
        multiples of 8).

    Raises:
        UsageError: a row's init image is not a readable image (read here, before any model loads).
    """
    from dallecli.engine.inputs import load_init_image, nearest_size

    sizes: dict[str, tuple[int, int]] = {}
    jobs = []
    for row in rows:
        if shard is not None and not shard.takes(row.row):
            continue
        given = row.settings

        init_image = given.get("image")
        if init_image is not None and init_image not in sizes:
            width, height = load_init_image(Path(init_image), f"line {row.line}: image").size
            sizes[init_image] = nearest_size(width), nearest_size(height)
        own = dict(zip(("width", "height"), sizes[init_image])) if init_image is not None else {}

        def pick(name, option):
            if name in given:
                return given[name]
            if option is None and name in own:
                return own[name]
            return option if option is not None else model_defaults[name]

        settings = Settings(
            negative_prompt=given.get("negative_prompt", options.negative_prompt) or None,
            steps=int(pick("steps", options.steps)), guidance_scale=float(pick("guidance", options.guidance)),
            width=int(pick("width", options.width)), height=int(pick("height", options.height)),
            model=model, scheduler=options.scheduler or "default",
            clip_skip=options.clip_skip if options.clip_skip != 1 else None,
            init_image=init_image, mask=given.get("mask"), strength=given.get("strength"), **(identity or {}),
            rerank=options.rerank, scorer=options.scorer if options.rerank else None,
        )
        per_image = options.rerank or 1  # candidate j of image i has the seed of image i*K + j of a plain run
        for image in range(given.get("n", options.n)):
            seeds = tuple(image_seed(base_seed, row.row, image * per_image + j, given.get("seed"))
                          for j in range(per_image))
            jobs.append(Job(row.row, row.line, image, row.prompt, seeds[0], settings,
                            seeds if options.rerank else ()))
    return jobs


def split_finished(jobs: Iterable[Job], finished: Mapping[tuple, object]) -> tuple[list[Job], list[Job]]:
    """Split jobs into (pending, done) by whether their key is among ``finished`` keys."""
    pending, done = [], []
    for job in jobs:
        (done if job.key() in finished else pending).append(job)
    return pending, done


def group_batches(jobs: Iterable[Job], batch_size: int) -> list[list[Job]]:
    """Group jobs with identical :class:`Settings` (in order of first appearance; rows with another init image,
    mask or strength are another group: a forward pass has one init image) and cut each group into forward
    passes of at most ``batch_size`` images; the last pass of a group may be smaller.

    Raises:
        UsageError: batch_size < 1.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    groups: dict[Settings, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.settings, []).append(job)
    return [group[start:start + batch_size] for group in groups.values()
            for start in range(0, len(group), batch_size)]
