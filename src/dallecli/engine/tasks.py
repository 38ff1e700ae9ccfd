"""Images in, images out: which pipelines can do image to image and inpainting, and the inputs they take.

A text-to-image pipeline is turned into its image-to-image or inpainting sibling with the sibling class's
``from_pipe`` (the same component objects: no second load, no weight copy). Whether a model can do a task is
decided from the pipeline class name in its ``model_index.json`` (or the detected family of a single file)
with :data:`TASK_PIPELINES`, before any weights load; the table follows diffusers' ``AutoPipelineForImage2Image``
and ``AutoPipelineForInpainting`` mappings (``tests/test_img2img.py`` checks that it does), kept here so
that the check imports no diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

from dallecli.engine.inputs import (MASK_THRESHOLD, InputImage, Upload, load_init_image, load_mask, mask_from_alpha,
                                    nearest_size)
from dallecli.engine.request import GenerationRequest
from dallecli.errors import TaskUnsupportedError, UsageError

# pipeline class in model_index.json -> (image-to-image class, inpainting class); None: diffusers has none
TASK_PIPELINES: dict[str, tuple[str | None, str | None]] = {
    "StableDiffusionPipeline": ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "StableDiffusionImg2ImgPipeline": ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "StableDiffusionInpaintPipeline": ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "StableDiffusionXLPipeline": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    "StableDiffusionXLImg2ImgPipeline": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    "StableDiffusionXLInpaintPipeline": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    "StableDiffusion3Pipeline": ("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    "FluxPipeline": ("FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    "LatentConsistencyModelPipeline": ("LatentConsistencyModelImg2ImgPipeline", None),
    "KolorsPipeline": ("KolorsImg2ImgPipeline", None),
    "PixArtAlphaPipeline": (None, None),
    "PixArtSigmaPipeline": (None, None),
}
VERBS = {"img2img": "image to image (--image)", "variation": "variations", "inpaint": "edit"}


def task_pipeline_class(pipeline_class: str | None, task: str) -> str | None:
    """The diffusers class that runs ``task`` ("txt2img", "img2img", "variation" or "inpaint") for a model whose
    pipeline class is ``pipeline_class``; None when there is none."""
    if task == "txt2img":
        return pipeline_class
    image_to_image, inpaint = TASK_PIPELINES.get(pipeline_class or "", (None, None))
    return inpaint if task == "inpaint" else image_to_image


def check_task(model: str, pipeline_class: str | None, task: str) -> str | None:
    """Check, from class names only (nothing loads), that a model can run ``task``.

    Returns:
        The diffusers class name that runs it (None for "txt2img" on an unknown class).

    Raises:
        TaskUnsupportedError: "MODEL cannot do edit" (or "variations", "image to image") naming the pipeline
            class (a :class:`~dallecli.errors.UsageError`).
    """
    if task == "txt2img":
        return pipeline_class
    name = task_pipeline_class(pipeline_class, task)
    if name is None:
        able = sorted({k.replace("Pipeline", "") for k, v in TASK_PIPELINES.items()
                       if (v[1] if task == "inpaint" else v[0]) and "Img2Img" not in k and "Inpaint" not in k})
        raise TaskUnsupportedError(f"{model} cannot do {VERBS[task]}: diffusers has no "
                         f"{'inpainting' if task == 'inpaint' else 'image-to-image'} pipeline for "
                         f"{pipeline_class or 'its pipeline'}; use a model of the {', '.join(able)} families")
    return name


def check_registry_task(spec, task: str) -> None:
    """Check a registry entry's family (``spec.family``) against ``task`` before it is resolved, so that a model
    that cannot do the task says so even when it is not downloaded (its pipeline class is then unknown).

    Raises:
        UsageError: as :func:`check_task`, for the family's pipeline class.
    """
    from dallecli.store.registry import PIPELINE_FAMILIES

    if spec is None or task == "txt2img" or getattr(spec, "kind", "pipeline") != "pipeline":
        return
    classes = [name for name, family in PIPELINE_FAMILIES.items() if family == spec.family]
    if classes and all(task_pipeline_class(name, task) is None for name in classes):
        check_task(spec.alias, classes[0], task)


def ends_at_zero_snr(scheduler) -> bool:
    """Whether ``scheduler``'s schedule starts from pure noise (zero terminal SNR): the rescaled betas of
    ``rescale_betas_zero_snr`` (diffusers keeps ``alphas_cumprod[-1] = 2**-24`` so that sigma stays finite) or a
    flow-matching schedule (sigma 1 at its start)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None and len(alphas):
        return float(alphas[-1]) < 1e-6
    return "FlowMatch" in type(scheduler).__name__ or bool(getattr(scheduler.config, "use_flow_sigmas", False))


@dataclass(frozen=True)
class PreparedInputs:
    """The inputs of one image task, read and checked before any model loads.

    Attributes:
        image: the init image (:class:`~dallecli.engine.inputs.InputImage`).
        mask: the mask file read, or None (no mask, or the image's alpha used as the mask).
        mask_image: the repaint mask at the image's size, "L" (0 keep .. 255 repaint); None for img2img.
        notes: one-line notes for the user (a size rounded to a multiple of 8, an alpha channel used as mask).
    """

    image: InputImage
    mask: InputImage | None
    mask_image: object | None
    notes: tuple[str, ...] = ()

    def sized(self, width: int, height: int):
        """(init image, mask or None) resized to ``width`` x ``height`` pixels (Lanczos for the image, bilinear
        for the mask); the images themselves when they already have that size."""
        from PIL import Image

        image, mask = self.image.rgb, self.mask_image
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
            mask = mask.resize((width, height), Image.Resampling.BILINEAR) if mask is not None else None
        return image, mask


def prepare_inputs(request: GenerationRequest) -> PreparedInputs:
    """Read the init image and mask of ``request`` and check them against it (nothing loads).

    Raises:
        UsageError: a file missing, unreadable or not an image (named); a mask of another size than the image;
            an inpainting request with neither a mask nor transparent pixels; a file whose SHA-256 is not the
            ``image_sha256``/``mask_sha256`` the request expects (a ``--from`` replay of a changed input).
    """
    task = request.resolved_task
    image = load_init_image(request.image, "IMAGE" if task in ("inpaint", "variation") else "--image")
    _check_digest("the init image", image, request.image_sha256)
    notes: list[str] = []
    mask_file = mask_image = None
    if request.mask is not None:
        mask_file = load_mask(request.mask, image.size, opaque_repaints=request.mask_alpha == "opaque")
        _check_digest("the mask", mask_file, request.mask_sha256)
        mask_image = mask_file.rgb
    elif task == "inpaint":
        mask_image = mask_from_alpha(image)
        option = "a mask" if isinstance(request.image, Upload) else "--mask MASK.png"
        if mask_image is None:
            raise UsageError(f"{image.name} has no transparent pixels to repaint; give {option} (white "
                             "= repaint, black = keep) or an image whose transparent areas are to be repainted")
        notes.append(f"{image.name}: no mask, so its transparent pixels are repainted (as OpenAI's edits do)")
    if task == "inpaint" and mask_image.getextrema()[1] < MASK_THRESHOLD:
        raise UsageError(f"the mask {mask_file.name if mask_file else image.name} is black everywhere: nothing to "
                         "repaint (white = repaint)")
    width, height = image.size
    if (width % 8 or height % 8) and (request.width, request.height) in (
            (None, None), (nearest_size(width), nearest_size(height))):
        notes.append(f"{image.name} is {width}x{height} pixels; sizes must be multiples of 8, so it is resized "
                     f"to {nearest_size(width)}x{nearest_size(height)} (give --width/--height to choose)")
    return PreparedInputs(image, mask_file, mask_image, tuple(notes))


def _check_digest(what: str, found: InputImage, expected: str | None) -> None:
    if expected is not None and found.sha256 != expected:
        raise UsageError(f"{what} {found.source} has changed since the image was made (SHA-256 {found.sha256[:12]}..., "
                         f"recorded {expected[:12]}...); restore the original file to replay it")


def size_for(request: GenerationRequest, inputs: PreparedInputs) -> tuple[int, int]:
    """(width, height) of the output: the request's, else the init image's rounded to multiples of 8."""
    width, height = inputs.image.size
    return request.width or nearest_size(width), request.height or nearest_size(height)


def paste_unmasked(generated, original, mask):
    """``generated`` where ``mask`` >= :data:`~dallecli.engine.inputs.MASK_THRESHOLD` (repaint), ``original``
    everywhere else, pixel for pixel: the kept area leaves dalle exactly as it came (all PIL, same size)."""
    from PIL import Image

    hard = mask.point(lambda value: 255 if value >= MASK_THRESHOLD else 0)
    return Image.composite(generated, original, hard)
