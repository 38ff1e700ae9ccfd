"""What ``dalle generate``, ``dalle edit`` and ``dalle variations`` share: run one request on a local engine and
write its images (a ``--from`` image is replayed by :mod:`dallecli.engine.replay`)."""

from __future__ import annotations

from pathlib import Path


def prepare_run(request, out: Path | None, fmt=None):
    """Fill the configured default scheduler, check ``request``, the output folder and what the output format
    (:class:`dallecli.images.OutputFormat`, default PNG) can hold, before any model loads.

    Returns:
        ``(request, folder)``: the request to run and the output folder (``--out``, else the default).

    Raises:
        UsageError: see :func:`dallecli.engine.request.validate_request`, an unknown ``--scheduler``, an
            output folder that cannot be written, or a size or prompt the format cannot hold.
    """
    from dataclasses import replace

    from dallecli.config import default_output_dir, user_default
    from dallecli.engine.request import validate_request
    from dallecli.engine.schedulers import validate_scheduler
    from dallecli.images import PNG, check_image_size, check_metadata_room, prepare_output_folder

    from dallecli.config import setting_source

    given = request.scheduler
    request = replace(request, scheduler=given or user_default("scheduler"))
    validate_request(request)
    validate_scheduler(request.scheduler, "--scheduler" if given else setting_source("scheduler") or "--scheduler")
    check_metadata_room(fmt or PNG, request.prompt, request.negative_prompt)
    if request.width is not None and request.height is not None:
        check_image_size(fmt or PNG, request.width, request.height)
    return request, prepare_output_folder(out or default_output_dir())


def prepare_rerank(candidates: int | None, keep: bool, scorer: str | None, cache_dir: Path | None):
    """Check ``--rerank``/``--keep-candidates``/``--scorer`` and find the scorer before any model loads.

    Returns:
        A :class:`dallecli.scoring.rerank.BestOf`, or None without ``--rerank``.

    Raises:
        UsageError: K out of range, or --keep-candidates/--scorer without --rerank.
        ModelNotFoundError: the scorer is not downloaded (the message says how to get it).
    """
    from dallecli.errors import UsageError
    from dallecli.scoring.clip import ClipScorer
    from dallecli.scoring.rerank import BestOf, check_candidates

    if candidates is None:
        if keep or scorer:
            raise UsageError(f"{'--keep-candidates' if keep else '--scorer'} needs --rerank K")
        return None
    check_candidates(candidates)
    return BestOf(candidates, ClipScorer.load(scorer, cache_dir), keep)


def run_local(request, folder: Path, *, json_output: bool, model: str | None, device: str | None = None,
              dtype: str | None = None, cache_dir: Path | None = None, vae: str | None = None,
              low_memory: bool | None = None, revision: str | None = None,
              recorded_revision: str | None = None, fmt=None, progress: str | None = None,
              best_of=None, backend: str | None = None) -> None:
    """Make the images of ``request`` with a local engine (the model's inpainting variant for an edit, when
    downloaded) and write them to ``folder`` in ``fmt`` (:class:`dallecli.images.OutputFormat`, default PNG):
    paths on stdout (or one JSON document); notes, warnings and progress (``progress``: the ``--progress``
    mode, see :func:`dallecli.cli.console.progress_mode`) on stderr. With ``best_of``, each image is the best of
    K candidates (:func:`dallecli.scoring.rerank.generate_reranked`) and records its score and rank.

    Raises:
        UsageError: an invalid request or input, or a model that cannot do the task (before anything loads).
        Interrupted: Ctrl-C; finished images are kept.
        DalleError: see :meth:`dallecli.engine.generate.Engine.generate`.
    """
    from dallecli.cli.console import (info, out as print_line, out_json, progress_bar, progress_mode,
                                      report_memory_choice, warn)
    from dallecli.cli.errors import Interrupted
    from dallecli.config import user_default
    from dallecli.engine.generate import Engine
    from dallecli.engine.request import effective_steps
    from dallecli.engine.schedulers import a1111_sampler
    from dallecli.images import PNG, check_image_size, write_image

    from dallecli.store.registry import lookup

    model = model or user_default("model")
    spec = lookup(model) if model else None
    # an inpainting entry (sd-1.5-inpainting) is for edits: `dalle edit --model` or the --from replay of one
    kind = "inpainting" if spec is not None and spec.kind == "inpainting" and request.resolved_task == "inpaint" \
        else "pipeline"
    if request.image is not None:  # "pixart-sigma cannot do edit", downloaded or not
        from dallecli.engine.tasks import check_registry_task

        check_registry_task(spec, request.resolved_task)
    mode = progress_mode(progress)  # a bad --progress or DALLE_PROGRESS is refused before anything loads
    engine = Engine(model, user_device(device), dtype or user_default("dtype"), cache_dir, vae=vae,
                    low_memory=low_memory, revision=revision, recorded_revision=recorded_revision, kind=kind,
                    backend=backend or user_default("backend"))
    if request.image is not None:
        engine = engine.for_task(request.resolved_task)
    for notice in engine.notices:
        info(notice)
    planned, _ = engine.plan(request)
    check_image_size(fmt or PNG, planned.width, planned.height)  # an init image's size, before the model loads
    report_memory_choice(engine.memory(planned.width, planned.height, min(planned.batch_size, planned.num_images),
                                       planned.guidance_scale > 1))
    written: list[dict] = []
    per_image = best_of.candidates if best_of else 1
    with progress_bar(planned.num_images * per_image * effective_steps(planned), "generating", mode=mode) as bar:
        try:
            with bar.loading():
                engine.pipe  # noqa: B018 - load here, so that the bar says "loading model", not 0/N
            for result, rerank, candidate in _results(engine, planned, best_of, lambda step, total: bar.advance()):
                for message in result.warnings:
                    warn(message)
                for applied in result.settings.loras if result.index == 0 else []:
                    info(f"LoRA {applied['name']}: {applied['tensors']} tensors applied to {applied['layers']} "
                         f"layers at scale {applied['scale']:g}")
                    if applied["tensors"] < applied["file_tensors"]:
                        warn(f"LoRA {applied['name']}: {applied['file_tensors'] - applied['tensors']} of its "
                             f"{applied['file_tensors']} tensors match no layer of this model")
                settings = result.settings.to_dict()
                if rerank:
                    settings["rerank"] = rerank
                if candidate:  # a loser of --rerank --keep-candidates
                    write_image(result.image, folder / "candidates", settings, a1111_sampler(settings["scheduler"]),
                                fmt=fmt)
                    continue
                path = write_image(result.image, folder, settings, a1111_sampler(settings["scheduler"]), fmt=fmt)
                written.append({"path": str(path), "seed": settings["seed"],
                                **({"clip_score": rerank["clip_score"]} if rerank else {})})
                if not json_output:
                    print_line(str(path))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {len(written)} finished image(s) kept in {folder}; the image in "
                              "progress was discarded") from None
    if json_output:
        parameters = {k: v for k, v in settings.items() if k not in ("seed", "rerank")}
        out_json({"images": written, "parameters": parameters})


def _results(engine, request, best_of, on_step):
    """``(GeneratedImage, rerank record or None, is a losing candidate)`` for each image to write: the engine's
    images as they come, or with ``best_of`` each group's winner (then its losers, when kept)."""
    if best_of is None:
        for result in engine.generate(request, on_step=on_step):
            yield result, None, False
        return
    from dallecli.scoring.rerank import generate_reranked

    for group in generate_reranked(engine, request, best_of.scorer, best_of.candidates, on_step=on_step):
        seeds = [ranked.result.settings.seed for ranked in sorted(group, key=lambda r: r.result.index)]
        for ranked in group if best_of.keep else group[:1]:
            yield ranked.result, ranked.metadata(best_of.scorer, seeds), ranked.rank > 1


def user_device(flag: str | None) -> str | None:
    """``--device``, else the user's default (``DALLE_DEVICE``, the config file); a default this machine lacks
    is refused in a message that names where it came from, not ``--device`` (imports torch to ask).

    Raises:
        DeviceUnavailableError: the configured device does not exist here.
    """
    from dallecli.config import setting_source, user_default

    value = flag or user_default("device")
    if flag or value is None:
        return value
    from dallecli.engine.device import resolve_device
    from dallecli.errors import DeviceUnavailableError

    try:
        resolve_device(value)
    except DeviceUnavailableError:
        raise DeviceUnavailableError(f"{setting_source('device')} asks for device '{value}', which is not available "
                                     "here; set it to auto or cpu, or pass --device") from None
    return value
