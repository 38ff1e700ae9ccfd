"""What every generation route does: resolve the model, check and plan the request, queue it, wait for the images.

The checks run before anything is queued, so a bad request writes nothing. The waiting is ``await``-ed: a
client that disconnects cancels only its wait; the pass runs and its images are written whole.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from dallecli.errors import DalleError
from dallecli.serve.batcher import Batcher, QueueFull, ShuttingDown
from dallecli.serve.checks import OPENAI_FIELDS, check_denoising, check_settings
from dallecli.serve.config import MAX_SIDE, ServeConfig
from dallecli.serve.errors import ApiError, from_dalle_error
from dallecli.serve.pool import EnginePool


@dataclass
class ServerState:
    """What the routes share: settings, engines, the queue, and the checkpoint AUTOMATIC1111 clients chose."""

    config: ServeConfig
    pool: EnginePool
    batcher: Batcher
    a1111_model: str | None = None


@dataclass(frozen=True)
class Generated:
    """The images of one request: ``(path, settings dict)`` each, and the engine's model name."""

    images: list[tuple[Path, dict]]
    model: str


async def resolve(state: ServerState, model: str | None, task: str = "txt2img"):
    """The engine that runs ``task`` for a request's ``model`` (in a thread: it reads configs, or downloads with
    ``--allow-download``).

    Raises:
        ApiError: 404 for a model that is not available (``model_not_found``), 400 for a model that cannot do
            ``task`` (``model_cannot_do_task``) or a malformed name.
    """
    from starlette.concurrency import run_in_threadpool

    try:
        return await run_in_threadpool(state.pool.engine_for_task, model, task)
    except DalleError as exc:
        raise from_dalle_error(exc, "model") from None


async def generate(state: ServerState, model: str | None, request, batch_size: int | None = None,
                   fields: dict[str, str] = OPENAI_FIELDS) -> Generated:
    """Make the images of ``request`` (a :class:`~dallecli.engine.request.GenerationRequest`; with an init image,
    mask and task for the image routes) with ``model``.

    Args:
        state: the server's state.
        model: the request's model name (None: the server's default).
        request: what to make.
        batch_size: images per forward pass the client asked for (None: the batcher chooses).
        fields: the request fields an error names (:data:`~dallecli.serve.checks.OPENAI_FIELDS` or
            :data:`~dallecli.serve.checks.A1111_FIELDS`).

    Raises:
        ApiError: 400 bad settings, 404 unknown model, 503 queue full or shutting down, 500 a failed pass.
    """
    from starlette.concurrency import run_in_threadpool

    check_settings(request, fields)
    engine = await resolve(state, model, request.resolved_task)

    def plan():
        if request.image is not None:
            check_denoising(request, engine.defaults()["steps"] if request.steps is None else request.steps, fields)
        return engine.plan(request)

    try:  # an init image or mask is read and checked here (a bad one: 400, nothing queued)
        planned, seeds = await run_in_threadpool(plan)
    except DalleError as exc:
        raise from_dalle_error(exc) from None
    if max(planned.width, planned.height) > MAX_SIDE:  # the size of an init image, when none was asked for
        raise ApiError(400, f"the image would be {planned.width}x{planned.height} pixels; at most {MAX_SIDE} per side "
                            "(send a smaller image, or a size)", param="size", code="invalid_size")
    items = [(planned.prompt, seed) for seed in seeds]
    try:
        future = state.batcher.submit(engine, planned, items, batch_size)
    except QueueFull as exc:
        raise ApiError(503, f"the server is busy: {exc}; retry later", type="server_error",
                       code="queue_full") from None
    except ShuttingDown as exc:
        raise ApiError(503, str(exc), type="server_error", code="shutting_down") from None
    try:
        images = await asyncio.wrap_future(future)
    except ShuttingDown as exc:
        raise ApiError(503, str(exc), type="server_error", code="shutting_down") from None
    except DalleError as exc:
        raise from_dalle_error(exc) from None
    return Generated(images, engine.model.name)
