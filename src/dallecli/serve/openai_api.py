"""The OpenAI Images API: ``POST /v1/images/generations`` and ``GET /v1/models``, shapes as OpenAI documents them.

Request: ``prompt``, ``model`` (a registry alias, a repo id or the embedded model; ``dall-e-2``, ``dall-e-3``
and ``gpt-image-1`` mean the server's default model), ``n`` (1-10), ``size`` ("WxH", multiples of 8, or
"auto"), ``response_format`` (``url`` or ``b64_json``), ``user``; fields OpenAI has and dalle does not use
(``quality``, ``style``, ``background``, ...) are accepted and ignored with a logged note. Extra fields:
``seed``, ``steps``, ``guidance_scale``, ``negative_prompt``, ``scheduler``, ``batch_size`` (images per forward
pass; ``dalle generate --server`` sends 1 so that its images equal an in-process run), ``clip_skip``.

Answer: ``{"created": unix seconds, "data": [{"url" | "b64_json", "revised_prompt": null, "dalle": settings}]}``
where ``dalle`` is the image's settings, the same dict as its PNG's ``dalle`` chunk.

``POST /v1/images/edits`` (multipart/form-data): ``image`` (a file; ``image[]``, several files as gpt-image
models take, uses the first, with a logged note), ``mask`` (optional file, the image's size: transparent =
repaint, as OpenAI's; without one, the image's own transparent pixels are repainted), ``prompt``, ``model``,
``n``, ``size``, ``response_format``, ``user``, and dalle's ``seed``, ``steps``, ``guidance_scale``,
``negative_prompt``, ``strength`` (default 1: the masked area is painted from noise), ``scheduler``,
``batch_size``. The pixels outside the mask are the input's own. ``POST /v1/images/variations``: ``image``,
``model``, ``n``, ``size``, ``response_format``, ``user``, and ``seed``, ``strength`` (default 0.6), ``prompt``
(used when the image's own metadata holds none, as ``dalle variations --prompt``), ``steps``,
``guidance_scale``, ``negative_prompt``, ``scheduler``, ``batch_size``. Both answer as generations do; the
images record the task, the strength and the upload as ``upload:<file name>`` with its SHA-256 (the server keeps
no copy, so ``dalle generate --from`` cannot replay them and says so). Uploads are read from memory by the loader
every command uses (:mod:`dallecli.engine.inputs`); nothing is written for a request that fails its checks.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from typing import Literal, Optional
from urllib.parse import quote

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from dallecli.engine.request import field_problem
from dallecli.serve.auth import file_signature
from dallecli.serve.checks import check_side
from dallecli.serve.config import MAX_IMAGES
from dallecli.serve.errors import bad_request, parse_json
from dallecli.serve.service import ServerState, generate

log = logging.getLogger("dallecli.serve")
router = APIRouter()
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")


class _ImageFields(BaseModel):
    """What every image route takes: OpenAI's fields and our extras (unknown fields are kept, to be named in the
    log)."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    model: Optional[str] = None
    n: Optional[int] = 1
    size: Optional[str] = None
    response_format: Optional[Literal["url", "b64_json"]] = None
    user: Optional[str] = None
    seed: Optional[int] = None
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    negative_prompt: Optional[str] = None
    scheduler: Optional[str] = None
    batch_size: Optional[int] = None


class ImageGenerationRequest(_ImageFields):
    """The body of ``POST /v1/images/generations``."""

    clip_skip: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"512x768"`` -> ``(512, 768)``; None or "auto" -> the model's own size.

    Raises:
        ApiError: 400 for a malformed size, a side not a multiple of 8, or larger than
            :data:`~dallecli.serve.config.MAX_SIDE` (:func:`~dallecli.serve.checks.check_side`).
    """
    if size is None or size.strip().lower() == "auto":
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise bad_request(f"Invalid size '{size}': give WIDTHxHEIGHT in pixels, e.g. 512x512", "size", "invalid_size")
    width, height = int(match.group(1)), int(match.group(2))
    check_side(width, "size"), check_side(height, "size")
    return width, height


def check_prompt(prompt: str | None, param: str = "prompt") -> str:
    """The prompt, or a 400 when it is empty, too long or holds a control character (the engine's rule for every
    command, :func:`dallecli.engine.request.field_problem`; the negative prompt is checked with the other settings,
    :func:`dallecli.serve.checks.check_settings`)."""
    if prompt is None or not prompt.strip():
        raise bad_request("The prompt is empty: give a non-empty prompt", param, "invalid_prompt")
    if problem := field_problem("prompt", prompt, label="The prompt"):
        raise bad_request(problem, param, "invalid_prompt")
    return prompt


class ImageEditForm(_ImageFields):
    """The fields of ``POST /v1/images/edits`` besides its files (form values arrive as text; pydantic converts)."""

    strength: Optional[float] = None


class ImageVariationForm(ImageEditForm):
    """The fields of ``POST /v1/images/variations`` besides the image (``prompt`` optional)."""

    prompt: Optional[str] = None


FILE_FIELDS = ("image", "image[]", "mask")


async def read_form(request: Request, form_model):
    """The multipart form of an image route: ``(fields as form_model, {"image": Upload, "mask": Upload or None})``.

    Raises:
        ApiError: 400 for a body that is not a form, a missing image, a text where a file belongs, bad fields.
    """
    from pydantic import ValidationError
    from starlette.datastructures import UploadFile

    from dallecli.engine.inputs import Upload

    kind = request.headers.get("content-type", "")
    if not kind.lower().startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise bad_request("Send the request as multipart/form-data with the image as a file (as OpenAI's "
                          f"{request.url.path} takes)", code="invalid_content_type")
    try:
        form = await request.form(max_files=8, max_fields=64)
    except Exception as exc:  # noqa: BLE001 - python-multipart's and starlette's parse errors alike
        raise bad_request(f"The multipart form could not be read ({exc})", code="invalid_form") from None
    try:
        files: dict[str, list] = {name: form.getlist(name) for name in FILE_FIELDS}
        images = files["image"] + files["image[]"]
        for name, values in (("image", images), ("mask", files["mask"])):
            if any(not isinstance(value, UploadFile) for value in values):
                raise bad_request(f"'{name}' must be a file (multipart/form-data with a filename)", name,
                                  "invalid_image")
        if not images:
            raise bad_request("Missing required parameter: 'image' (the image file)", "image",
                              "missing_required_parameter")
        if len(images) > 1:
            log.info("%s: %d images sent; dalle uses the first (%s)", request.url.path, len(images),
                     images[0].filename or "image")
        if len(files["mask"]) > 1:
            raise bad_request("Send at most one 'mask'", "mask")
        uploads = {"image": Upload(images[0].filename or "image", await images[0].read(), "image")}
        mask = files["mask"][0] if files["mask"] else None
        uploads["mask"] = Upload(mask.filename or "mask", await mask.read(), "mask") if mask is not None else None
        fields = {key: value for key, value in form.multi_items() if key not in FILE_FIELDS}
    finally:
        await form.close()
    try:
        return form_model.model_validate(fields), uploads
    except ValidationError as exc:
        from dallecli.serve.errors import validation_error

        raise validation_error(exc.errors()) from None


def check_count(n: int | None) -> int:
    """``n`` (None: 1), or a 400 outside 1..:data:`MAX_IMAGES`."""
    n = 1 if n is None else n
    if not 1 <= n <= MAX_IMAGES:
        raise bad_request(f"Invalid value for 'n': {n}; it must be between 1 and {MAX_IMAGES}", "n", "invalid_n")
    return n


def check_batch_size(batch_size: int | None) -> None:
    """A 400 for a ``batch_size`` below 1."""
    if batch_size is not None and batch_size < 1:
        raise bad_request(f"Invalid value for 'batch_size': {batch_size}; it must be at least 1", "batch_size")


def log_ignored(route: str, body: BaseModel) -> None:
    """Log the fields a request sent that dalle does not use (OpenAI's ``quality``, ``style``, ...)."""
    ignored = sorted(body.model_extra or {})
    if ignored:
        log.info("%s: ignored field(s) dalle does not use: %s", route, ", ".join(ignored))


def answer(request: Request, state: ServerState, made, response_format: str | None) -> dict:
    """The images answer: ``{"created", "data": [{"url" | "b64_json", "revised_prompt", "dalle"}]}``."""
    data = []
    for path, settings in made.images:
        item = ({"b64_json": base64.b64encode(path.read_bytes()).decode("ascii")}
                if response_format == "b64_json" else {"url": file_url(request, state, path.name)})
        data.append({**item, "revised_prompt": None, "dalle": settings})
    return {"created": int(time.time()), "data": data}


def file_url(request: Request, state: ServerState, name: str) -> str:
    """The absolute URL of an image in the output folder (signed when the server has a key)."""
    url = f"{str(request.base_url).rstrip('/')}/files/{quote(name)}"
    if state.config.api_key:
        url += f"?sig={file_signature(state.config.api_key, name)}"
    return url


@router.post("/v1/images/generations")
async def images_generations(request: Request) -> dict:
    """Create images from a prompt (OpenAI Images API)."""
    from dallecli.engine.request import GenerationRequest

    body = await parse_json(request, ImageGenerationRequest)
    state: ServerState = request.app.state.dalle
    prompt = check_prompt(body.prompt)
    n = check_count(body.n)
    width, height = parse_size(body.size)
    if body.size is None:
        check_side(body.width, "width"), check_side(body.height, "height")
        width, height = body.width, body.height
    check_batch_size(body.batch_size)
    log_ignored("/v1/images/generations", body)
    generation = GenerationRequest(
        prompt=prompt, negative_prompt=body.negative_prompt or None, num_images=n, seed=body.seed, steps=body.steps,
        guidance_scale=body.guidance_scale, width=width, height=height, scheduler=body.scheduler,
        clip_skip=body.clip_skip,
    )
    made = await generate(state, body.model, generation, body.batch_size)
    return answer(request, state, made, body.response_format)


@router.post("/v1/images/edits")
async def images_edits(request: Request) -> dict:
    """Repaint the masked part of an image from a prompt (OpenAI Images API, multipart)."""
    from dallecli.engine.request import GenerationRequest

    body, files = await read_form(request, ImageEditForm)
    state: ServerState = request.app.state.dalle
    prompt = check_prompt(body.prompt)
    n, (width, height) = check_count(body.n), parse_size(body.size)
    check_batch_size(body.batch_size)
    log_ignored("edits", body)
    generation = GenerationRequest(
        prompt=prompt, negative_prompt=body.negative_prompt or None, num_images=n, seed=body.seed, steps=body.steps,
        guidance_scale=body.guidance_scale, width=width, height=height, scheduler=body.scheduler, task="inpaint",
        image=files["image"], mask=files["mask"], strength=body.strength,
    )
    made = await generate(state, body.model, generation, body.batch_size)
    return answer(request, state, made, body.response_format)


@router.post("/v1/images/variations")
async def images_variations(request: Request) -> dict:
    """New images like the one sent (OpenAI Images API, multipart): image to image from it, with the prompt its
    own metadata holds (dalle's or AUTOMATIC1111's), else ``prompt``, else none."""
    import io

    from dallecli.engine.request import GenerationRequest
    from dallecli.images import stored_prompt

    body, files = await read_form(request, ImageVariationForm)
    state: ServerState = request.app.state.dalle
    if files["mask"] is not None:
        raise bad_request("variations take no 'mask'; use /v1/images/edits to repaint part of an image", "mask")
    n, (width, height) = check_count(body.n), parse_size(body.size)
    check_batch_size(body.batch_size)
    log_ignored("variations", body)
    try:
        found, found_negative = stored_prompt(io.BytesIO(files["image"].data))
    except Exception:  # noqa: BLE001 - an upload's metadata is anyone's; the loader reports an unreadable image
        found, found_negative = None, None
    if found is not None:
        log.info("variations: prompt from %s's metadata: %s", files["image"].name, found[:200])
    prompt = found or body.prompt or ""
    if prompt:
        check_prompt(prompt)
    generation = GenerationRequest(
        prompt=prompt, negative_prompt=body.negative_prompt or (found_negative if found else None), num_images=n,
        seed=body.seed, steps=body.steps, guidance_scale=body.guidance_scale, width=width, height=height,
        scheduler=body.scheduler, task="variation", image=files["image"], strength=body.strength,
    )
    made = await generate(state, body.model, generation, body.batch_size)
    return answer(request, state, made, body.response_format)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The models a request can name: the default, the embedded one and the downloaded pipelines."""
    from starlette.concurrency import run_in_threadpool

    state: ServerState = request.app.state.dalle
    models = await run_in_threadpool(state.pool.available_models)
    return {"object": "list", "data": [{"id": m["id"], "object": "model", "created": m["created"],
                                        "owned_by": "dallecli"} for m in models]}
