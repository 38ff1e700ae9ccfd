"""Replay an image: the request stored in its metadata (``dalle generate --from``), with every value given
explicitly winning over the stored one. Below the CLI, so a library user replays an image the same way::

    path = Path("out/0003-42-a-red-circle.png")
    stored = dallecli.images.read_metadata(path)
    settings = merge_stored(stored, steps=30)                      # the stored request, with 30 steps
    request = GenerationRequest(**request_fields(settings), **replay_inputs(stored, path, None, None))
    engine = Engine(settings["model"], dtype=settings["dtype"], vae=settings["vae"],
                    recorded_revision=settings["recorded_revision"])
"""

from __future__ import annotations

from pathlib import Path

from dallecli.engine.request import LoraSpec
from dallecli.errors import UsageError

# Settings a ``--from`` image gives back when not given again: the request's and the engine's (model, dtype, vae,
# backend).
REPLAYED = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "clip_skip",
            "model", "dtype", "vae", "backend")
ENGINE_SETTINGS = ("model", "dtype", "vae", "backend", "recorded_revision")


def merge_stored(stored: dict, *, scheduler: str | None = None, loras: tuple[LoraSpec, ...] | None = None,
                 **given) -> dict:
    """The settings of a replay: each value given (not None) wins over the stored one.

    Args:
        stored: settings read from an image (:func:`dallecli.images.read_metadata`; ``{}`` for none): dalle's
            own keys, or an AUTOMATIC1111 image's (its ``sampler`` is mapped to a scheduler name).
        scheduler: the scheduler given; None takes the stored one.
        loras: the LoRAs given; None or empty takes the stored ones (with their scales).
        **given: values for the names in :data:`REPLAYED` (None: take the stored one).

    Returns:
        A dict with every name in :data:`REPLAYED`, ``scheduler``, ``loras`` (a tuple of :class:`LoraSpec`)
        and ``recorded_revision`` (the stored model revision when the model is the stored one, else None).

    Raises:
        TypeError: a name that is not in :data:`REPLAYED`.
    """
    from dallecli.engine.schedulers import from_a1111_sampler

    unknown = sorted(set(given) - set(REPLAYED))
    if unknown:
        raise TypeError(f"merge_stored() got unexpected settings: {', '.join(unknown)}")
    merged = {key: given[key] if given.get(key) is not None else stored.get(key) for key in REPLAYED}
    if isinstance(merged["backend"], dict):  # an image records {"name": "openvino", "precision": "bf16"}
        merged["backend"] = merged["backend"].get("name")
    merged["scheduler"] = scheduler or stored.get("scheduler") or from_a1111_sampler(stored.get("sampler"))
    merged["loras"] = tuple(loras) if loras else tuple(
        LoraSpec(entry.get("registry") or entry["path"], entry.get("scale", 1.0)) for entry in stored.get("loras") or [])
    merged["recorded_revision"] = stored.get("model_revision") if merged["model"] == stored.get("model") else None
    return merged


def request_fields(merged: dict) -> dict:
    """The :class:`~dallecli.engine.request.GenerationRequest` keyword arguments among ``merged`` (the
    engine's settings, :data:`ENGINE_SETTINGS`, left out).

    Args:
        merged: from :func:`merge_stored`.

    Returns:
        A new dict without the engine's settings; an empty negative prompt is None (none).
    """
    fields = {key: value for key, value in merged.items() if key not in ENGINE_SETTINGS}
    fields["negative_prompt"] = fields.get("negative_prompt") or None
    return fields


def replay_inputs(stored: dict, source: Path | None, image: Path | None, strength: float | None) -> dict:
    """The init image, mask, strength and task a ``--from`` image recorded, as :class:`GenerationRequest` fields
    (empty for a text-to-image one). An ``--image`` given on the command line replaces the recorded inputs;
    the recorded files must still be there with the SHA-256 they had (the engine checks the digests).

    Args:
        stored: settings read from the image (``{}`` for none).
        source: the image they were read from (named in messages).
        image: an init image given instead of the recorded one, or None.
        strength: a strength given instead of the recorded one, or None.

    Returns:
        ``image`` and ``strength``, and for a recorded input also ``image_sha256``, ``task``, ``mask`` and
        ``mask_sha256``.

    Raises:
        UsageError: a recorded input file is missing, or its record is damaged.
    """
    recorded = stored.get("init_image")
    if image is not None or not recorded:
        return {"image": str(image) if image is not None else None, "strength": strength}
    fields = {"image": recorded.get("path"), "image_sha256": recorded.get("sha256"), "task": stored.get("task"),
              "strength": strength if strength is not None else stored.get("strength")}
    mask = stored.get("mask") or {}
    fields.update(mask=mask.get("path"), mask_sha256=mask.get("sha256"))
    from dallecli.engine.inputs import is_upload

    for what, path, digest in (("init image", fields["image"], fields["image_sha256"]),
                               ("mask", fields["mask"], fields["mask_sha256"])):
        if path is None and digest is None:
            continue
        if not isinstance(path, str) or not isinstance(digest, str):
            raise UsageError(f"{source} has a damaged dalle metadata chunk: its {what} record lacks a path or sha256")
        if is_upload(path):  # sent to `dalle serve`, which keeps no copy of what clients upload
            command = {"inpaint": "edit", "variation": "variations"}.get(fields["task"], "generate --image")
            raise UsageError(f"{source} was made by `dalle serve` from an uploaded {what} ({path}, SHA-256 "
                             f"{digest[:12]}...) of which no copy was kept, so --from cannot replay it; run `dalle "
                             f"{command}` on the original file(s) with the recorded seed, or give --image to start "
                             "from another")
        try:
            present = Path(path).is_file()
        except (OSError, ValueError):  # a NUL byte or an over-long name in a file from anyone
            present = False
        if not present:
            raise UsageError(f"the {what} {path} that {source} was made from is missing; put it back to replay the "
                             "image (or give --image to start from another)")
    return fields
