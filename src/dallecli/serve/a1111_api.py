"""The AUTOMATIC1111 API routes that Open WebUI and A1111 plug-ins call.

- ``POST /sdapi/v1/txt2img``: ``prompt``, ``negative_prompt``, ``steps``, ``cfg_scale``, ``width``, ``height``,
  ``seed`` (-1: random), ``batch_size``, ``n_iter``, ``sampler_name`` (and ``scheduler``, "Karras"),
  ``override_settings.sd_model_checkpoint``; other fields are ignored. As in A1111, image k gets seed + k and the
  images run ``batch_size`` per forward pass. Answer: ``{"images": [base64 PNG, ...], "parameters": {...},
  "info": "<JSON string>"}``.
- ``POST /sdapi/v1/img2img``: the same fields, and ``init_images`` (base64 images, data URLs accepted; the first
  is used), ``mask`` (base64, optional: white = repaint, as A1111's; a mask with transparency uses its alpha as
  A1111 does: opaque = repaint), ``denoising_strength`` (default 0.75), ``width``/``height`` (default: the init
  image's size; another size resizes it). Without a mask it is image to image, with one an edit (the pixels
  outside the mask are kept). ``inpainting_mask_invert``, ``mask_blur``, ``inpainting_fill``, ``resize_mode`` and
  the like are not implemented: a non-default value gets 400 rather than a different picture.
- ``GET /sdapi/v1/sd-models``: ``title``, ``model_name``, ``hash``, ``sha256``, ``filename``, ``config``.
- ``GET /sdapi/v1/samplers``: ``name``, ``aliases``, ``options``.
- ``GET``/``POST /sdapi/v1/options``: Open WebUI reads ``sd_model_checkpoint`` and posts the options back with
  the model it wants; other options are accepted and ignored.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from dallecli import __version__
from dallecli.serve.config import MAX_A1111_IMAGES
from dallecli.serve.errors import bad_request, parse_json
from dallecli.serve.checks import A1111_FIELDS, check_side
from dallecli.serve.openai_api import check_prompt, log_ignored
from dallecli.serve.service import ServerState, generate, resolve

log = logging.getLogger("dallecli.serve")
router = APIRouter(prefix="/sdapi/v1")


class Txt2ImgRequest(BaseModel):
    """The body of ``POST /sdapi/v1/txt2img`` (A1111's ``StableDiffusionProcessingTxt2Img`` fields we use)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: Optional[str] = None
    steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    seed: Optional[int] = -1
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None
    scheduler: Optional[str] = None
    override_settings: Optional[dict[str, Any]] = None


class Img2ImgRequest(Txt2ImgRequest):
    """The body of ``POST /sdapi/v1/img2img`` (A1111's ``StableDiffusionProcessingImg2Img`` fields we use)."""

    init_images: list[str] = []
    mask: Optional[str] = None
    denoising_strength: Optional[float] = 0.75
    inpainting_mask_invert: Optional[int] = 0
    mask_blur: Optional[int] = None
    inpainting_fill: Optional[int] = None
    inpaint_full_res: Optional[bool] = None
    resize_mode: Optional[int] = 0


class Options(BaseModel):
    """The body of ``POST /sdapi/v1/options``: any options; ``sd_model_checkpoint`` is the one used."""

    model_config = ConfigDict(extra="allow")


def scheduler_for(sampler: str | None, schedule: str | None) -> str | None:
    """Our scheduler name for A1111's ``sampler_name`` (+ ``scheduler``: "Karras" picks Karras sigmas), or None
    for the model's own.

    Raises:
        ApiError: 400 for a sampler dalle does not have.
    """
    from dallecli.engine.schedulers import from_a1111_sampler

    if not sampler:
        return None
    name = sampler.strip()
    if schedule and schedule.strip().lower() == "karras" and not name.lower().endswith("karras"):
        name += " Karras"
    found = from_a1111_sampler(name) or from_a1111_sampler(sampler)
    if found is None:
        raise bad_request(f"Sampler not found: '{sampler}' (see GET /sdapi/v1/samplers)", "sampler_name")
    return found


def checkpoint_name(title: str | None) -> str | None:
    """A1111 titles read ``name [hash]``; the name is what dalle resolves."""
    if title is None:
        return None
    return re.sub(r"\s*\[[0-9a-fA-F]{6,}\]\s*$", "", title.strip()) or None


def _check_common(body: Txt2ImgRequest, route: str) -> str:
    """Check what txt2img and img2img share; returns the prompt.

    Raises:
        ApiError: 400 for an empty prompt, a count out of range, a bad size.
    """
    prompt = check_prompt(body.prompt)
    if body.batch_size < 1 or body.n_iter < 1 or body.batch_size * body.n_iter > MAX_A1111_IMAGES:
        raise bad_request(f"batch_size x n_iter must be between 1 and {MAX_A1111_IMAGES} (got {body.batch_size} x "
                          f"{body.n_iter})", "batch_size")
    check_side(body.width, "width"), check_side(body.height, "height")
    log_ignored(route, body)
    return prompt


@router.post("/txt2img")
async def txt2img(request: Request) -> dict:
    """Create images from a prompt (AUTOMATIC1111 API)."""
    from dallecli.engine.request import GenerationRequest

    body = await parse_json(request, Txt2ImgRequest)
    state: ServerState = request.app.state.dalle
    prompt = _check_common(body, "txt2img")
    override = checkpoint_name((body.override_settings or {}).get("sd_model_checkpoint"))
    generation = GenerationRequest(
        prompt=prompt, negative_prompt=body.negative_prompt or None, num_images=body.batch_size * body.n_iter,
        seed=body.seed, steps=body.steps, guidance_scale=body.cfg_scale, width=body.width, height=body.height,
        scheduler=scheduler_for(body.sampler_name or body.sampler_index, body.scheduler),
    )
    made = await generate(state, override or state.a1111_model, generation, body.batch_size, A1111_FIELDS)
    return _answer(body, made)


def _decode(text: str, field: str):
    """An A1111 base64 image (a ``data:image/png;base64,`` prefix allowed) as an
    :class:`~dallecli.engine.inputs.Upload` named after its field.

    Raises:
        ApiError: 400 for text that is not base64.
    """
    import binascii

    from dallecli.engine.inputs import Upload

    data = text.split(",", 1)[1] if text.lstrip().startswith("data:") and "," in text else text
    try:
        return Upload(field, base64.b64decode(data.strip(), validate=False), field)
    except (binascii.Error, ValueError):
        raise bad_request(f"'{field}' is not a base64-encoded image", field.split("[")[0]) from None


@router.post("/img2img")
async def img2img(request: Request) -> dict:
    """Image to image, or with a mask an edit (AUTOMATIC1111 API)."""
    from dallecli.engine.request import GenerationRequest

    body = await parse_json(request, Img2ImgRequest)
    state: ServerState = request.app.state.dalle
    prompt = _check_common(body, "img2img")
    if not body.init_images:
        raise bad_request("Missing required parameter: 'init_images' (a list of base64 images)", "init_images",
                          "missing_required_parameter")
    for name, value, default in (("inpainting_mask_invert", body.inpainting_mask_invert, 0),
                                 ("resize_mode", body.resize_mode, 0)):
        if value not in (None, default):
            raise bad_request(f"'{name}' {value} is not implemented by dalle (only {default})", name)
    if len(body.init_images) > 1:
        log.info("img2img: %d init_images sent; dalle uses the first", len(body.init_images))
    image = _decode(body.init_images[0], "init_images[0]")
    mask = _decode(body.mask, "mask") if body.mask else None
    override = checkpoint_name((body.override_settings or {}).get("sd_model_checkpoint"))
    generation = GenerationRequest(
        prompt=prompt, negative_prompt=body.negative_prompt or None, num_images=body.batch_size * body.n_iter,
        seed=body.seed, steps=body.steps, guidance_scale=body.cfg_scale, width=body.width, height=body.height,
        scheduler=scheduler_for(body.sampler_name or body.sampler_index, body.scheduler),
        task="inpaint" if mask is not None else "img2img", image=image, mask=mask,
        strength=body.denoising_strength, mask_alpha="opaque",
    )
    made = await generate(state, override or state.a1111_model, generation, body.batch_size, A1111_FIELDS)
    return _answer(body, made)


def _answer(body: Txt2ImgRequest, made) -> dict:
    """A1111's answer: ``{"images": [base64 PNG], "parameters": the request as run, "info": JSON string}``."""
    from dallecli.images import a1111_parameters

    settings = [s for _, s in made.images]
    first = settings[0]
    from dallecli.engine.schedulers import a1111_sampler

    sampler = a1111_sampler(first["scheduler"])
    info = {
        "prompt": first["prompt"], "all_prompts": [s["prompt"] for s in settings],
        "negative_prompt": first["negative_prompt"] or "",
        "all_negative_prompts": [s["negative_prompt"] or "" for s in settings],
        "seed": first["seed"], "all_seeds": [s["seed"] for s in settings],
        "subseed": -1, "all_subseeds": [-1] * len(settings), "subseed_strength": 0,
        "width": first["width"], "height": first["height"], "sampler_name": sampler,
        "cfg_scale": first["guidance_scale"], "steps": first["steps"], "batch_size": body.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": first["model"],
        "sd_model_hash": _short_hash(first["model_revision"]), "sd_vae_name": first.get("vae"),
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": first.get("strength") or 0,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [a1111_parameters(s, a1111_sampler(s["scheduler"])) for s in settings],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": first.get("clip_skip") or 1,
        "is_using_inpainting_conditioning": False, "version": f"dallecli {__version__}",
    }
    parameters = body.model_dump(exclude_none=False, exclude={"init_images", "mask"})
    parameters.update(steps=first["steps"], cfg_scale=first["guidance_scale"], width=first["width"],
                      height=first["height"], seed=first["seed"], sampler_name=sampler)
    images = [base64.b64encode(path.read_bytes()).decode("ascii") for path, _ in made.images]
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def _short_hash(revision: str | None) -> str | None:
    """A1111's 10-character model hash: of a Hub commit or a single file's sha256 (None for the embedded model)."""
    digest = (revision or "").removeprefix("sha256:")
    return digest[:10] if re.fullmatch(r"[0-9a-f]{40,64}", digest) else None


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict]:
    """The models, as A1111 lists its checkpoints; ``title`` is what ``sd_model_checkpoint`` takes."""
    from starlette.concurrency import run_in_threadpool

    state: ServerState = request.app.state.dalle
    models = await run_in_threadpool(state.pool.available_models)
    return [{"title": m["id"], "model_name": m["id"], "hash": _short_hash(m["revision"]),
             "sha256": m["revision"].removeprefix("sha256:") if (m["revision"] or "").startswith("sha256:") else None,
             "filename": m["id"], "config": None} for m in models]


@router.get("/samplers")
async def samplers() -> list[dict]:
    """The samplers (dalle's ``--scheduler`` names are the aliases)."""
    from dallecli.engine.schedulers import SCHEDULERS

    return [{"name": a1111, "aliases": [name], "options": {}} for name, (_, _, a1111) in SCHEDULERS.items()]


async def _current_model(state: ServerState) -> str:
    engine = await resolve(state, state.a1111_model)
    return engine.model.name


@router.get("/options")
async def get_options(request: Request) -> dict:
    """A1111's options that clients read: ``sd_model_checkpoint`` (the model txt2img uses)."""
    state: ServerState = request.app.state.dalle
    return {"sd_model_checkpoint": await _current_model(state), "sd_checkpoint_hash": None,
            "samples_format": "png", "CLIP_stop_at_last_layers": 1}


@router.post("/options")
async def set_options(request: Request) -> None:
    """Set ``sd_model_checkpoint`` (checked: 404 for a model that is not available); other options are ignored."""
    body = (await parse_json(request, Options)).model_extra or {}
    state: ServerState = request.app.state.dalle
    if "sd_model_checkpoint" in body:
        name = checkpoint_name(body["sd_model_checkpoint"] if isinstance(body["sd_model_checkpoint"], str) else None)
        if name is None:
            raise bad_request("sd_model_checkpoint must be a model name", "sd_model_checkpoint")
        engine = await resolve(state, name)
        state.a1111_model = engine.model.name if name != state.pool.default_model else None
        log.info("AUTOMATIC1111 checkpoint set to %s", engine.model.name)
    return None
