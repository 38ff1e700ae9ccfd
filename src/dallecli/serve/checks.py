"""The checks of a request's values that every image route runs before anything is queued, in the API's words.

The rules are the engine's, one for every command (:func:`dallecli.engine.request.field_problem`); only the names
differ: an answer names the request's field (``steps``, ``guidance_scale``, ``strength``; AUTOMATIC1111's
``cfg_scale`` and ``denoising_strength``), never the CLI's flag (``--steps``), in the shape
"Invalid value for 'steps': ...". The server adds one limit of its own, :data:`~dallecli.serve.config.MAX_SIDE`.
"""

from __future__ import annotations

from dallecli.engine.request import DEFAULT_STRENGTH, denoising_problem, field_problem
from dallecli.serve.config import MAX_SIDE
from dallecli.serve.errors import bad_request

# the engine's field name -> the request field that carries it, per API
OPENAI_FIELDS = {"steps": "steps", "guidance": "guidance_scale", "strength": "strength", "seed": "seed",
                 "clip_skip": "clip_skip", "negative_prompt": "negative_prompt"}
A1111_FIELDS = {**OPENAI_FIELDS, "guidance": "cfg_scale", "strength": "denoising_strength"}


def _label(param: str) -> str:
    return f"Invalid value for '{param}':"


def check_side(value: int | None, param: str) -> None:
    """A 400 for an image side (pixels) out of the server's range (8 to :data:`MAX_SIDE`) or not a multiple of 8
    (the engine's rule, naming the nearest valid sizes); None (the model's size) passes.

    Raises:
        ApiError: 400 ``invalid_size`` naming ``param`` ("size", "width", "height").
    """
    if value is None:
        return
    if not 8 <= value <= MAX_SIDE:  # the server's own limit, below the engine's 8192
        raise bad_request(f"{_label(param)} {value} is out of range (8-{MAX_SIDE} pixels on this server)", param,
                          "invalid_size")
    if problem := field_problem("width", value, label=_label(param)):
        raise bad_request(problem, param, "invalid_size")


def check_settings(request, fields: dict[str, str] = OPENAI_FIELDS) -> None:
    """A 400 naming the request field (``fields``: engine name -> request field) for a step count, guidance
    scale, strength, seed, clip skip or negative prompt the engine would refuse
    (:func:`~dallecli.engine.request.field_problem`), before any model is looked up.

    Args:
        request: the :class:`~dallecli.engine.request.GenerationRequest` a route built.
        fields: :data:`OPENAI_FIELDS` or :data:`A1111_FIELDS`.

    Raises:
        ApiError: 400 with ``param`` the request field.
    """
    for field, value in (("steps", request.steps), ("guidance", request.guidance_scale),
                         ("strength", request.strength)):
        if value is not None and (problem := field_problem(field, value, label=_label(fields[field]))):
            raise bad_request(problem, fields[field])
    if request.seed is not None and (problem := field_problem("seed", request.seed, label=_label(fields["seed"]),
                                                              num_images=request.num_images)):
        raise bad_request(problem, fields["seed"])
    if request.clip_skip is not None and (problem := field_problem("clip_skip", request.clip_skip,
                                                                   label=_label(fields["clip_skip"]))):
        raise bad_request(problem, fields["clip_skip"])
    if request.negative_prompt and (problem := field_problem("negative_prompt", request.negative_prompt,
                                                             label="The negative prompt")):
        raise bad_request(problem, fields["negative_prompt"])


def check_denoising(request, default_steps: int, fields: dict[str, str] = OPENAI_FIELDS) -> None:
    """A 400 for an init-image request whose strength leaves no denoising step (``int(steps * strength) < 1``, the
    engine's rule, :func:`~dallecli.engine.request.denoising_problem`, in the API's words), naming the fewest
    steps that work.

    Args:
        request: the request, its strength already checked (:func:`check_settings`); ``strength`` None means the
            task's default.
        default_steps: the model's steps, used when the request has none.
        fields: :data:`OPENAI_FIELDS` or :data:`A1111_FIELDS`.

    Raises:
        ApiError: 400 with ``param`` the strength field when the request set one, else ``steps``.
    """
    if request.image is None:
        return
    strength = request.strength if request.strength is not None else DEFAULT_STRENGTH[request.resolved_task]
    steps = request.steps if request.steps is not None else default_steps
    name, steps_name = fields["strength"], fields["steps"]
    if problem := denoising_problem(steps, strength, steps_name=f"'{steps_name}'", strength_name=f"'{name}'",
                                    counted=f"'{steps_name}'", verb="send"):
        raise bad_request(problem, name if request.strength is not None else steps_name)
