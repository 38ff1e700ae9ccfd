"""What ``dalle generate``, ``dalle edit`` and ``dalle variations`` share: run one request on a local engine and
write its images (a ``--from`` image is replayed by :mod:`dallecli.engine.replay`)."""

from __future__ import annotations

from pathlib import Path


def prepare_run(request, out: Path | None):
    """Fill the configured default scheduler, check ``request`` and the output folder before any model loads.

    Returns:
        ``(request, folder)``: the request to run and the output folder (``--out``, else the default).

    Raises:
        UsageError: see :func:`dallecli.engine.request.validate_request`, an unknown ``--scheduler``, or an
            output folder that cannot be written.
    """
    from dataclasses import replace

    from dallecli.config import default_output_dir, user_default
    from dallecli.engine.request import validate_request
    from dallecli.engine.schedulers import validate_scheduler
    from dallecli.images import prepare_output_folder

    request = replace(request, scheduler=request.scheduler or user_default("scheduler"))
    validate_request(request)
    validate_scheduler(request.scheduler)
    return request, prepare_output_folder(out or default_output_dir())


def run_local(request, folder: Path, *, json_output: bool, model: str | None, device: str | None = None,
              dtype: str | None = None, cache_dir: Path | None = None, vae: str | None = None,
              low_memory: bool | None = None, revision: str | None = None,
              recorded_revision: str | None = None) -> None:
    """Make the images of ``request`` with a local engine (the model's inpainting variant for an edit, when
    downloaded) and write them to ``folder``: paths on stdout (or one JSON document), notes and warnings on stderr.

    Raises:
        UsageError: an invalid request or input, or a model that cannot do the task (before anything loads).
        Interrupted: Ctrl-C; finished images are kept.
        DalleError: see :meth:`dallecli.engine.generate.Engine.generate`.
    """
    from dallecli.cli.console import info, out as print_line, out_json, progress_bar, report_memory_choice, warn
    from dallecli.cli.errors import Interrupted
    from dallecli.config import user_default
    from dallecli.engine.generate import Engine
    from dallecli.engine.request import effective_steps
    from dallecli.engine.schedulers import a1111_sampler
    from dallecli.images import write_png

    from dallecli.store.registry import lookup

    model = model or user_default("model")
    spec = lookup(model) if model else None
    # an inpainting entry (sd-1.5-inpainting) is for edits: `dalle edit --model` or the --from replay of one
    kind = "inpainting" if spec is not None and spec.kind == "inpainting" and request.resolved_task == "inpaint" \
        else "pipeline"
    if request.image is not None:  # "pixart-sigma cannot do edit", downloaded or not
        from dallecli.engine.tasks import check_registry_task

        check_registry_task(spec, request.resolved_task)
    engine = Engine(model, device or user_default("device"), dtype or user_default("dtype"), cache_dir, vae=vae,
                    low_memory=low_memory, revision=revision, recorded_revision=recorded_revision, kind=kind)
    if request.image is not None:
        engine = engine.for_task(request.resolved_task)
    for notice in engine.notices:
        info(notice)
    planned, _ = engine.plan(request)
    report_memory_choice(engine.memory(planned.width, planned.height, min(planned.batch_size, planned.num_images),
                                       planned.guidance_scale > 1))
    written: list[dict] = []
    with progress_bar(planned.num_images * effective_steps(planned), "generating") as bar:
        try:
            for result in engine.generate(planned, on_step=lambda step, total: bar.advance()):
                for message in result.warnings:
                    warn(message)
                for applied in result.settings.loras if result.index == 0 else []:
                    info(f"LoRA {applied['name']}: {applied['tensors']} tensors applied to {applied['layers']} "
                         f"layers at scale {applied['scale']:g}")
                    if applied["tensors"] < applied["file_tensors"]:
                        warn(f"LoRA {applied['name']}: {applied['file_tensors'] - applied['tensors']} of its "
                             f"{applied['file_tensors']} tensors match no layer of this model")
                settings = result.settings.to_dict()
                path = write_png(result.image, folder, settings, a1111_sampler(settings["scheduler"]))
                written.append({"path": str(path), "seed": settings["seed"]})
                if not json_output:
                    print_line(str(path))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {len(written)} finished image(s) kept in {folder}; the image in "
                              "progress was discarded") from None
    if json_output:
        parameters = {k: v for k, v in settings.items() if k != "seed"}
        out_json({"images": written, "parameters": parameters})
