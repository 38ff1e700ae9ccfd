"""``dalle upscale``: enlarge an image with a diffusion upscaler, tile by tile, so memory stays bounded.

Two diffusers pipelines are supported, both registry entries of kind "upscaler":

* ``StableDiffusionUpscalePipeline`` (``sd-x4-upscaler``): text-guided latent super-resolution (Rombach et al.
  2022, "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR, the SD 2 x4 upscaler). The
  low-resolution image itself, noised to ``noise_level`` by a DDPM schedule (the ``low_res_scheduler``), is
  concatenated to the 4 latent channels (a 7-channel UNet); the latents have the low-resolution size and a VAE
  with a scale factor of 4 decodes them to 4x the size.
* ``StableDiffusionLatentUpscalePipeline`` (``sd-x2-latent-upscaler``): Katherine Crowson's latent upscaler
  (k-diffusion), in SD's latent space: the image is encoded by SD's VAE, upscaled 2x as latents, decoded.

**Tiling** (the memory bound). The input is padded (edge pixels repeated) to a multiple of the pipeline's
alignment and cut into overlapping tiles of ``tile`` low-resolution pixels a side (default: 128 for x4, which the
model was trained on as 512-pixel crops of output; 512 for x2). Each tile is upscaled alone and pasted into a
float32 canvas with linear feathering across each overlap: a tile's weight ramps from ~0 at the edge it shares
with a neighbour to 1 where the overlap ends, so the two weights sum to ~1 and seams fade out (the blend that
MultiDiffusion, Bar-Tal et al. 2023, arXiv 2302.08113, applies at every denoising step, applied here once to the
finished tiles, so that only one tile is ever in memory).
The starting noise of all tiles is one tensor drawn from the seed for the whole (padded) latent, each tile
taking its slice, so the result does not depend on how it is tiled beyond the model's receptive field. Peak
memory is therefore the model's weights + one tile's activations (independent of the input size) + 16 bytes per
output pixel for the canvas (float32 RGB sum and weight; 268 MB for a 4096x4096 output) + the starting noise
(16 bytes per latent pixel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dallecli import __version__
from dallecli.engine.device import resolve_device, resolve_dtype
from dallecli.engine.loading import load_pipeline
from dallecli.engine.schedulers import scheduler_name
from dallecli.engine.failures import check_finite, out_of_memory
from dallecli.errors import UsageError
from dallecli.store.registry import upscale_factors, upscaler_for
from dallecli.store.resolve import ResolvedModel, resolve_model
from dallecli.weightfiles import pipeline_class_name

StepCallback = Callable[[int, int], None]  # (steps done over all tiles, steps in all)


@dataclass(frozen=True)
class UpscalerLayout:
    """What tiling needs to know about one upscaler pipeline class.

    Attributes:
        scale: output pixels per input pixel, each side.
        align: tile sides (and the padded input) are multiples of this many input pixels: the UNet halves the
            latents 3 times, so the latent side must be a multiple of 8 (x4: latent = input; x2: latent =
            input / 4).
        min_tile: the smallest tile side, input pixels (x2: its UNet needs >= 2 latent pixels at the bottom).
        default_tile: the tile side used when none is given, input pixels.
        noise_level: whether the pipeline takes ``noise_level``.
    """

    scale: int
    align: int
    min_tile: int
    default_tile: int
    noise_level: bool


LAYOUTS = {
    "StableDiffusionUpscalePipeline": UpscalerLayout(scale=4, align=8, min_tile=16, default_tile=128, noise_level=True),
    "StableDiffusionLatentUpscalePipeline": UpscalerLayout(scale=2, align=32, min_tile=64, default_tile=512,
                                                           noise_level=False),
}
MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's max_noise_level (the x4 model_index.json)


@dataclass(frozen=True)
class UpscaleRequest:
    """One ``dalle upscale`` run; None fields take the model's registry defaults.

    Attributes:
        image: the input image file.
        scale: 2 or 4 (each side); picks the registry upscaler when ``model`` is None.
        model: an upscaler alias, repo id or folder; None for the registry's upscaler for ``scale``.
        prompt: text guidance; None for the prompt in the image's own metadata (dalle or A1111), else "".
        negative_prompt: what to steer away from (only with guidance > 1).
        steps: ``num_inference_steps`` per tile (1-1000).
        guidance: classifier-free guidance scale (0-100; <= 1 turns it off).
        noise_level: x4 only, 0-350: noise added to the low-resolution image (more lets the model invent more).
        seed: seed of the starting noise (0 <= seed < 2**32); None draws one.
        tile: tile side in input pixels (a multiple of the model's alignment, see :data:`LAYOUTS`); 0 upscales the
            whole image in one pass; None uses the model's default.
        overlap: overlap between neighbouring tiles, input pixels (a multiple of the alignment, < tile); None
            for a quarter of the tile.
    """

    image: Path
    scale: int = 4
    model: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    noise_level: int | None = None
    seed: int | None = None
    tile: int | None = None
    overlap: int | None = None


@dataclass(frozen=True)
class Tile:
    """A tile of the padded input: top-left corner and size, input pixels."""

    x: int
    y: int
    width: int
    height: int


@dataclass
class UpscaledImage:
    """The result: ``image`` a PIL RGB image of ``scale`` x the input size; ``settings`` its metadata."""

    image: object
    settings: dict
    warnings: list[str] = field(default_factory=list)


def check_request(request: UpscaleRequest) -> None:
    """The checks of ``request`` that need no model (before anything is resolved or downloaded is looked for):
    the prompts, steps, guidance and seed by the rules of every request
    (:func:`dallecli.engine.request.field_problem`), then what only an upscale has.

    Raises:
        UsageError: a prompt too long or with control characters, steps outside 1-1000, guidance outside
            0-100, a seed outside [0, 2**32) (-1: random), a noise level outside 0-350, a negative tile or overlap.
    """
    from dallecli.engine.request import field_problem

    for name, value in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt),
                        ("steps", request.steps), ("guidance", request.guidance), ("seed", request.seed)):
        if value is not None and (problem := field_problem(name, value)):
            raise UsageError(problem)
    if request.noise_level is not None and not 0 <= request.noise_level <= MAX_NOISE_LEVEL:
        raise UsageError(f"--noise-level {request.noise_level}: give 0 to {MAX_NOISE_LEVEL}")
    for name, value in (("--tile", request.tile), ("--overlap", request.overlap)):
        if value is not None and value < 0:
            raise UsageError(f"{name} {value}: give 0 or more pixels")


def check_scale(scale: int) -> None:
    """Raises UsageError unless the registry has an upscaler for ``scale``."""
    factors = upscale_factors()
    if scale not in factors:
        raise UsageError(f"--scale {scale}: the upscalers enlarge {' or '.join(map(str, factors))} times each side")


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles start along one axis of ``length`` pixels: every ``tile - overlap`` pixels, the last one flush
    with the end (so it may overlap its neighbour more); ``[0]`` when one tile covers the axis."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile] if starts[-1] != length - tile else starts


def plan_tiles(width: int, height: int, tile: int, overlap: int) -> list[Tile]:
    """The tiles that cover a ``width`` x ``height`` (padded) input, row by row. ``tile`` 0: one tile."""
    if tile <= 0:
        return [Tile(0, 0, width, height)]
    return [Tile(x, y, min(tile, width), min(tile, height))
            for y in axis_starts(height, tile, overlap) for x in axis_starts(width, tile, overlap)]


def feather_weights(tile: Tile, tiles: list[Tile], scale: int):
    """Blending weights of ``tile``'s output, float32 of shape (height*scale, width*scale): 1 inside, a linear
    ramp over each overlap with another tile (from ~0 at the shared edge to ~1 where the overlap ends)."""
    import numpy as np

    def ramp(length: int, before: int, after: int):
        weight = np.ones(length, np.float32)
        if before > 0:
            weight[:before] = (np.arange(before, dtype=np.float32) + 0.5) / before
        if after > 0:
            weight[length - after:] = np.minimum(weight[length - after:],
                                                 (np.arange(after, 0, -1, dtype=np.float32) - 0.5) / after)
        return weight

    def overlaps(start: int, size: int, others: list[tuple[int, int]]) -> tuple[int, int]:
        end = start + size
        before = max((e - start for s, e in others if s < start < e), default=0)
        after = max((end - s for s, e in others if s < end < e), default=0)
        return before, after

    columns = [(t.x, t.x + t.width) for t in tiles if t.y == tile.y and t != tile]
    rows = [(t.y, t.y + t.height) for t in tiles if t.x == tile.x and t != tile]
    left, right = overlaps(tile.x, tile.width, columns)
    top, bottom = overlaps(tile.y, tile.height, rows)
    wx = ramp(tile.width * scale, left * scale, right * scale)
    wy = ramp(tile.height * scale, top * scale, bottom * scale)
    return wy[:, None] * wx[None, :]


def _pad_to(image, width: int, height: int):
    """``image`` (PIL RGB) enlarged to ``width`` x ``height`` by repeating its last column and row."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image)
    pad = ((0, height - array.shape[0]), (0, width - array.shape[1]), (0, 0))
    return Image.fromarray(np.pad(array, pad, mode="edge")) if any(p[1] for p in pad[:2]) else image


class Upscaler:
    """An upscaler model on a device, resolved at construction (nothing heavy), loaded on first :meth:`upscale`.

    Args:
        model: an upscaler registry alias, repo id or local pipeline folder; None for the registry's upscaler
            for ``scale``.
        scale: 2 or 4, each side; when ``model`` is given it must make this scale.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps" (None = auto).
        dtype: "auto", "float32", "float16" or "bfloat16" (None = the device's policy).
        cache_dir: HF cache folder, as given to ``dalle download --cache-dir``.

    Raises:
        UsageError: a scale no upscaler makes; the embedded model or a registry entry that is not an upscaler
            ("sd-1.5 is a text-to-image model: use `dalle generate`"); a folder whose pipeline is not an upscaler
            or makes another scale.
        ModelNotFoundError: the upscaler is not downloaded (the message names `dalle download NAME`).
        DeviceUnavailableError: the device does not exist.
    """

    def __init__(self, model: str | None = None, scale: int = 4, device: str | None = None,
                 dtype: str | None = None, cache_dir: Path | None = None):
        check_scale(scale)
        if model is None:
            model = upscaler_for(scale).alias
        self.model: ResolvedModel = resolve_model(model, cache_dir=cache_dir, kind="upscaler")
        class_name = pipeline_class_name(self.model.path) if not self.model.single_file else None
        if class_name not in LAYOUTS:
            raise UsageError(f"{model} holds a {class_name or 'single-file checkpoint'}, not an upscaler "
                             f"({', '.join(LAYOUTS)}); `dalle upscale` cannot use it")
        self.layout = LAYOUTS[class_name]
        if self.layout.scale != scale:
            raise UsageError(f"--model {model} upscales {self.layout.scale}x, not {scale}x; give --scale "
                             f"{self.layout.scale} or leave --model out")
        self.spec = self.model.spec
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(self.device, dtype, self.spec.dtype if self.spec else None).dtype
        self.notices: list[str] = [self.model.notice] if self.model.notice else []
        self._pipe = None

    @property
    def pipe(self):
        """The loaded diffusers pipeline (loads it on first access)."""
        if self._pipe is None:
            variant = (self.spec.variant if self.spec else None) or "fp16"
            self._pipe = load_pipeline(self.model.path, self.device, self.dtype, variant)
        return self._pipe

    def defaults(self) -> dict:
        """``{"steps", "guidance", "noise_level"}`` for this upscaler (registry entry, else diffusers' defaults)."""
        spec = self.spec
        if spec is not None and spec.kind == "upscaler":
            return {"steps": spec.steps, "guidance": spec.guidance, "noise_level": spec.noise_level}
        return {"steps": 75 if self.layout.noise_level else 20, "guidance": 9.0 if self.layout.noise_level else 0.0,
                "noise_level": 20 if self.layout.noise_level else None}

    def plan(self, request: UpscaleRequest, size: tuple[int, int]) -> dict:
        """Check ``request`` against this model for an input of ``size`` = (width, height) pixels, before
        anything loads, and fill in the defaults.

        Returns:
            ``{"steps", "guidance", "noise_level", "seed", "tile", "overlap", "padded": (w, h), "tiles": [Tile]}``.

        Raises:
            UsageError: what :func:`check_request` refuses, a noise level given to the x2 upscaler, a tile or
                overlap that is not a multiple of the alignment (the nearest valid values named), an overlap >=
                the tile.
        """
        from dallecli.engine.generate import random_seed

        check_request(request)
        layout, defaults = self.layout, self.defaults()
        steps = defaults["steps"] if request.steps is None else request.steps
        guidance = defaults["guidance"] if request.guidance is None else request.guidance
        noise_level = request.noise_level
        if noise_level is not None and not layout.noise_level:
            raise UsageError(f"--noise-level: {self.model.name} takes no noise level (only the x4 upscaler does)")
        if layout.noise_level:
            noise_level = defaults["noise_level"] if noise_level is None else noise_level
        seed = random_seed() if request.seed in (None, -1) else request.seed
        align = layout.align
        tile = layout.default_tile if request.tile is None else request.tile
        if tile < 0 or (tile and (tile % align or tile < layout.min_tile)):
            low = max(layout.min_tile, tile - tile % align)
            raise UsageError(f"--tile {tile}: {self.model.name} needs a multiple of {align} pixels, at least "
                             f"{layout.min_tile} (try {low} or {low + align}), or 0 for no tiling")
        overlap = request.overlap
        if overlap is None:
            overlap = max(align, tile // 4 // align * align) if tile else 0
        if tile and (overlap < 0 or overlap % align or overlap >= tile):
            raise UsageError(f"--overlap {overlap}: give a multiple of {align} pixels below the tile ({tile})")
        width, height = size

        def padded(side: int) -> int:
            return max(layout.min_tile, -(-side // align) * align)

        padded_size = (padded(width), padded(height))
        tiles = plan_tiles(*padded_size, tile if tile and max(padded_size) > tile else 0, overlap)
        return {"steps": steps, "guidance": guidance, "noise_level": noise_level, "seed": seed, "tile": tile,
                "overlap": overlap, "padded": padded_size, "tiles": tiles}

    def upscale(self, image, plan: dict, prompt: str, negative_prompt: str | None = None,
                on_step: StepCallback | None = None):
        """Upscale ``image`` tile by tile as :meth:`plan` laid out.

        Args:
            image: the input, a PIL RGB image of the size given to :meth:`plan`.
            plan: :meth:`plan`'s result.
            prompt: text guidance ("" for none).
            negative_prompt: with guidance > 1, what to steer away from.
            on_step: called after each denoising step with (steps done, total steps over all tiles).

        Returns:
            A PIL RGB image, ``scale`` x ``image``'s size.

        Raises:
            NonFiniteOutputError: a tile decoded to NaN/Inf (half-precision overflow).
            OutOfMemoryError: one tile does not fit on the device (the message says to lower ``--tile``).
        """
        import numpy as np
        import torch
        from PIL import Image

        scale, width, height = self.layout.scale, *image.size
        padded_w, padded_h = plan["padded"]
        source = _pad_to(image, padded_w, padded_h)
        pipe = self.pipe
        ratio = scale / pipe.vae_scale_factor  # latent pixels per input pixel (x4: 1, x2: 1/4)
        channels = pipe.vae.config.latent_channels
        generator = torch.Generator("cpu").manual_seed(plan["seed"])
        noise = torch.randn((1, channels, int(padded_h * ratio), int(padded_w * ratio)), generator=generator,
                            dtype=torch.float32)  # (1, 4, H', W'), the whole picture's starting noise
        canvas = np.zeros((padded_h * scale, padded_w * scale, 3), np.float32)
        weight_sum = np.zeros((padded_h * scale, padded_w * scale, 1), np.float32)
        tiles, steps = plan["tiles"], plan["steps"]
        done = 0

        def step(*_):
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(done, len(tiles) * steps)

        for number, tile in enumerate(tiles):
            crop = source.crop((tile.x, tile.y, tile.x + tile.width, tile.y + tile.height))
            y0, x0 = int(tile.y * ratio), int(tile.x * ratio)
            latents = noise[:, :, y0:y0 + int(tile.height * ratio), x0:x0 + int(tile.width * ratio)]
            kwargs = {"prompt": prompt, "image": crop, "num_inference_steps": steps,
                      "guidance_scale": plan["guidance"], "generator": torch.Generator("cpu").manual_seed(plan["seed"]),
                      "latents": latents.to(pipe.device, pipe.unet.dtype), "output_type": "np",
                      "callback": step, "callback_steps": 1}
            if negative_prompt and plan["guidance"] > 1:
                kwargs["negative_prompt"] = negative_prompt
            if plan["noise_level"] is not None:
                kwargs["noise_level"] = plan["noise_level"]
            with out_of_memory(f"one {tile.width}x{tile.height} tile does not fit in {self.device} memory; give "
                               "a smaller --tile"), torch.inference_mode():
                out = pipe(**kwargs).images[0]  # (height*scale, width*scale, 3), 0..1
            check_finite(out, self.dtype, f"tile {number + 1} of {len(tiles)}")
            weights = feather_weights(tile, tiles, scale)[:, :, None]
            ys, xs = tile.y * scale, tile.x * scale
            canvas[ys:ys + out.shape[0], xs:xs + out.shape[1]] += out * weights
            weight_sum[ys:ys + out.shape[0], xs:xs + out.shape[1]] += weights
        result = canvas / weight_sum
        del canvas, weight_sum
        pixels = np.clip(np.round(result[: height * scale, : width * scale] * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels)


def upscale_file(upscaler: Upscaler, request: UpscaleRequest, on_step: StepCallback | None = None,
                 *, input_image=None, plan: dict | None = None) -> UpscaledImage:
    """Read ``request.image``, upscale it, and build its metadata (what the PNG records).

    Args:
        upscaler: the model (:class:`Upscaler`).
        request: the run.
        on_step: progress, as for :meth:`Upscaler.upscale`.
        input_image: the :class:`dallecli.engine.inputs.InputImage` already read (the CLI reads it first, to
            refuse a bad file before anything loads); read here when None.
        plan: :meth:`Upscaler.plan`'s result for this request and input (made here when None).

    Returns:
        :class:`UpscaledImage`; its ``settings`` hold ``task`` "upscale", the prompt (and where it came from),
        seed, steps, guidance, noise level, scale, output size, model and revision, the input's path, SHA-256
        and size, the tiling, dtype, device and version.

    Raises:
        UsageError: an unreadable input, or settings :meth:`Upscaler.plan` refuses.
        NonFiniteOutputError, OutOfMemoryError: as :meth:`Upscaler.upscale`.
    """
    from dallecli.engine.inputs import load_init_image

    source = input_image or load_init_image(request.image, "IMAGE")
    prompt, prompt_source = request.prompt, "option"
    if prompt is None:
        from dallecli.images import stored_prompt

        prompt, prompt_source = stored_prompt(request.image)[0], "image metadata"
        if not prompt:
            prompt, prompt_source = "", "none"
    plan = plan or upscaler.plan(request, source.size)
    image = upscaler.upscale(source.rgb, plan, prompt, request.negative_prompt, on_step)
    scheduler = scheduler_name(upscaler.pipe.scheduler)  # as generate records it: our short name, else the class
    settings = {
        "task": "upscale", "prompt": prompt, "prompt_source": prompt_source,
        "negative_prompt": request.negative_prompt or None, "seed": plan["seed"], "steps": plan["steps"],
        "guidance_scale": plan["guidance"], "noise_level": plan["noise_level"], "scale": upscaler.layout.scale,
        "width": image.size[0], "height": image.size[1], "model": upscaler.model.name,
        "model_revision": upscaler.model.revision, "scheduler": scheduler,
        "input": {"path": str(source.path), "sha256": source.sha256, "width": source.size[0],
                  "height": source.size[1]},
        "tiling": {"tile": plan["tile"], "overlap": plan["overlap"], "tiles": len(plan["tiles"])},
        "dtype": upscaler.dtype, "device": upscaler.device, "version": __version__,
    }
    warnings = []
    if prompt and plan["guidance"] == 0 and not upscaler.layout.noise_level:
        warnings.append(f"{upscaler.model.name} ignores the prompt at guidance 0 (its default); give --guidance "
                        "above 1 to steer it with the prompt")
    return UpscaledImage(image, settings, warnings)


def rerun_command(settings: dict) -> list[str]:
    """The ``dalle upscale`` argv that remakes an upscaled image from its metadata (``dalle info``'s rerun line):
    the recorded input file, model, scale, prompt, seed, steps, guidance, noise level and tiling."""
    argv = ["dalle", "upscale", str(settings.get("input", {}).get("path", "IMAGE")), "--scale",
            str(settings.get("scale")), "--model", str(settings.get("model")), "--prompt", settings.get("prompt") or ""]
    for option, key in (("--negative-prompt", "negative_prompt"), ("--seed", "seed"), ("--steps", "steps"),
                        ("--guidance", "guidance_scale"), ("--noise-level", "noise_level")):
        if settings.get(key) is not None:
            argv += [option, f"{settings[key]:g}" if isinstance(settings[key], float) else str(settings[key])]
    tiling = settings.get("tiling") or {}
    if tiling.get("tile") is not None:
        argv += ["--tile", str(tiling["tile"]), "--overlap", str(tiling.get("overlap", 0))]
    return argv
