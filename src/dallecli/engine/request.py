"""What a generation asks for (:class:`GenerationRequest`) and what one image was made with (:class:`ImageSettings`)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from dallecli.errors import UsageError

if TYPE_CHECKING:
    from dallecli.engine.inputs import Upload

MAX_SEED = 2**32 - 1
RANDOM_SEED = -1  # AUTOMATIC1111's way to ask for a random seed; the seed drawn is recorded
MAX_STEPS = 1000  # the training timesteps of every supported schedule; schedulers refuse more steps
MAX_GUIDANCE = 100.0  # far above any useful guidance scale (1-20); catches typos, inf and NaN
# The longest prompt (and negative prompt) accepted, in characters: OpenAI's limit for gpt-image-1, so every client
# of ``dalle serve`` fits, and far beyond what a text encoder reads (CLIP: 75 tokens, about 300 characters; T5: 512
# tokens). It bounds what is stored: each image's metadata, each manifest line. File names keep a 60-byte slug.
MAX_PROMPT_CHARS = 32_000
# Control characters (Unicode category Cc) a prompt may not hold: C0 but tab, line feed and carriage return (a
# prompt may span lines, as AUTOMATIC1111's do), DEL and C1. NUL ends a C string in other tools' readers, ESC
# drives terminals; none means anything to a text encoder.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_CONTROL_NAMES = {0x00: "NUL", 0x07: "BEL", 0x08: "BS", 0x1B: "ESC", 0x7F: "DEL"}
# What a request does with its input image: text to image (no image), image to image (``--image``), inpainting
# (``dalle edit``: image and mask), or a variation (``dalle variations``: image to image whose prompt may be empty).
TASKS = ("txt2img", "img2img", "inpaint", "variation")
# The strength used when none is given (fraction of the denoising schedule that is run, (0, 1]):
#   img2img 0.75: AUTOMATIC1111's default denoising strength; keeps the layout, redraws the details.
#   variation 0.6: a variation must still show its input's subject, and an image with no prompt in its metadata
#     (a user's own photo) has only the strength to hold it. Measured on the embedded model (6 shapes-world
#     inputs x 3 seeds, 12 steps, the project's detector): with the stored prompt every strength from 0.5 to 0.9
#     keeps colour, shape and background (18/18) and 0.6 keeps the position in 16/18 (0.75: 14, 0.85: 11);
#     with an empty prompt, 0.6 keeps colour, shape and background in 8/18, 0.75 in 5/18, 0.85 in 2/18.
#   inpaint 1.0: the masked area is repainted from pure noise (what OpenAI's edits endpoint does); lower values
#     keep some of what was under the mask.
DEFAULT_STRENGTH = {"img2img": 0.75, "variation": 0.6, "inpaint": 1.0}


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the scale it is applied with (0 disables it)."""

    path: str
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    """A text-to-image request. ``None`` fields take the model's registry defaults.

    Attributes:
        prompt: the text to draw.
        negative_prompt: what to steer away from (only has an effect with guidance_scale > 1).
        num_images: images to make, >= 1.
        seed: seed of image 0; image i gets ``seed + i``. None or -1 (:data:`RANDOM_SEED`) draws a random
            seed (recorded).
        steps: ``num_inference_steps``, 1 to :data:`MAX_STEPS`.
        guidance_scale: classifier-free guidance scale, 0 to :data:`MAX_GUIDANCE`; 0 (or <= 1) turns guidance off.
        width, height: image size in pixels, multiples of 8.
        scheduler: a name from :data:`dallecli.engine.schedulers.SCHEDULERS`, or None for the model's own.
        batch_size: images per forward pass (None: 1, so each image is reproducible alone bit for bit;
            larger is faster and may move a pixel by one 8-bit level against another batch size).
        loras: LoRAs to apply, in order.
        clip_skip: AUTOMATIC1111's clip skip: 1 (or None) uses the text encoder's last layer, 2 the penultimate
            layer's output, ... (diffusers' ``clip_skip`` is this minus 1).
        task: one of :data:`TASKS`, or None to take it from the inputs (``image`` -> "img2img", ``image`` and
            ``mask`` -> "inpaint", neither -> "txt2img"). "variation" allows an empty prompt.
        image: the init image file (img2img, inpainting, variations); any format Pillow reads.
        mask: the inpainting mask file: white = repaint, black = keep (an alpha channel: transparent = repaint);
            the image's size. With task "inpaint" and no mask, the image's own transparency is the mask.
        strength: the fraction of the denoising schedule run on the noised init image, in (0, 1]; the
            effective number of steps is ``int(steps * strength)`` (:func:`effective_steps`). None: the task's
            :data:`DEFAULT_STRENGTH`.
        image_sha256, mask_sha256: the SHA-256 the files must have (``--from`` replays refuse a changed input);
            None: not checked.
        mask_alpha: how a mask with transparency is read: "transparent" (OpenAI's edits, ``dalle edit``:
            transparent = repaint) or "opaque" (AUTOMATIC1111's img2img: the alpha is the mask, opaque = repaint).

    ``image`` and ``mask`` may also be :class:`~dallecli.engine.inputs.Upload` s (``dalle serve``: the bytes a
    client sent, read without a file; recorded as ``upload:<name>`` with their SHA-256).
    """

    prompt: str
    negative_prompt: str | None = None
    num_images: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    batch_size: int | None = None
    loras: tuple[LoraSpec, ...] = ()
    clip_skip: int | None = None
    task: str | None = None
    image: str | Upload | None = None
    mask: str | Upload | None = None
    strength: float | None = None
    image_sha256: str | None = None
    mask_sha256: str | None = None
    mask_alpha: str = "transparent"

    @property
    def resolved_task(self) -> str:
        """The task this request runs (see ``task``)."""
        if self.task:
            return self.task
        if self.image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    def with_defaults(self, defaults: dict) -> GenerationRequest:
        """Fill ``None`` fields from ``{"steps", "guidance", "width", "height"}``, and ``strength`` from the
        task's :data:`DEFAULT_STRENGTH` when there is an init image."""
        task = self.resolved_task
        return replace(
            self,
            strength=self.strength if self.strength is not None or task == "txt2img" else DEFAULT_STRENGTH[task],
            steps=self.steps if self.steps is not None else defaults["steps"],
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else defaults["guidance"],
            width=self.width if self.width is not None else defaults["width"],
            height=self.height if self.height is not None else defaults["height"],
        )


@dataclass(frozen=True)
class ImageSettings:
    """Everything one image was made with; written into its PNG as the ``dalle`` chunk."""

    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    model: str
    model_revision: str | None
    scheduler: str
    dtype: str
    device: str
    version: str
    loras: list[dict] = field(default_factory=list)
    truncation: dict | None = None
    vae: str | None = None  # a replacement VAE (``--vae``), None for the model's own
    clip_skip: int | None = None  # A1111 numbering, >= 2; None when no layer was skipped (not written then)
    unknown_words: list[str] | None = None  # prompt words the model was not trained on (embedded model only)
    task: str | None = None  # "img2img", "inpaint" or "variation"; None (not written) for text to image
    init_image: dict | None = None  # {"path": absolute path, "sha256": 64 hex digits} of the init image
    mask: dict | None = None  # {"path", "sha256"} of the mask file; None when none (or the image's alpha) was used
    strength: float | None = None  # denoising strength in (0, 1]; None for text to image
    backend: dict | None = None  # {"name": "openvino", "precision": "f32"|"bf16"}; None (not written) for PyTorch

    def to_dict(self) -> dict:
        data = asdict(self)
        for optional in ("clip_skip", "unknown_words", "task", "init_image", "mask", "strength", "backend"):  # only when set
            if not data[optional]:
                del data[optional]
        return data


def nearest_multiples(value: int, base: int = 8) -> tuple[int, int]:
    """The multiples of ``base`` just below and just above ``value`` (pixels)."""
    low = max(base, value - value % base)
    return low, low + base


def effective_steps(request: GenerationRequest) -> int | None:
    """The denoising steps a request runs: ``int(steps * strength)`` with an init image (diffusers' rule), else
    ``steps``; None while ``steps`` is unknown. At strength 1.0 every step runs."""
    if request.steps is None or request.image is None or request.strength is None:
        return request.steps
    return min(int(request.steps * request.strength), request.steps)


def smallest_steps(strength: float) -> int:
    """The fewest steps for which ``int(steps * strength) >= 1`` (strength in (0, 1])."""
    steps = max(1, math.ceil(1 / strength))
    while int(steps * strength) < 1:  # float rounding: 1/0.1 * 0.1 may fall just short of 1
        steps += 1
    return steps


def field_problem(field: str, value, *, label: str | None = None, num_images: int = 1,
                  random_seed: bool = True) -> str | None:
    """What is wrong with one request field's value, or None when it is in range (also the batch row check).

    Args:
        field: "width", "height" (pixels, 8-8192, multiples of 8), "steps" (1 to :data:`MAX_STEPS`),
            "guidance" (0 to :data:`MAX_GUIDANCE`), "strength" (in (0, 1]), "seed" (0 to :data:`MAX_SEED`),
            "clip_skip" (a whole number >= 1), or "prompt"/"negative_prompt" (at most :data:`MAX_PROMPT_CHARS`
            characters, no control character but tab, line feed and carriage return).
        value: the value, already an int (a float for guidance and strength, a str for the prompts); NaN is out
            of range. A clip skip that is not an int (a bool, a float, a str) is refused.
        label: how the message names the field (default: the option, ``--FIELD``).
        num_images: images made from the seed (image i gets ``seed + i``), which lowers the highest seed.
        random_seed: whether -1 (:data:`RANDOM_SEED`) is accepted as a seed.

    Returns:
        A message naming the field, the range and the bad value; None when the value is valid.
    """
    label = label or f"--{field.replace('_', '-')}"
    if field in ("prompt", "negative_prompt"):
        return _prompt_problem(value, label)
    if field in ("width", "height"):
        if value < 8 or value > 8192:
            return f"{label} {value} is out of range (8-8192 pixels)"
        if value % 8:
            low, high = nearest_multiples(value)
            return f"{label} {value} is not a multiple of 8; the nearest valid sizes are {low} and {high}"
    elif field == "steps":
        if not 1 <= value <= MAX_STEPS:
            return f"{label} must be between 1 and {MAX_STEPS}, the diffusion's training timesteps (got {value})"
    elif field == "guidance":
        if not 0 <= value <= MAX_GUIDANCE:  # NaN fails this comparison too: it would reach metadata and JSON
            return f"{label} must be between 0 and {MAX_GUIDANCE:g} (got {value})"
    elif field == "strength":
        if isinstance(value, bool) or not 0 < value <= 1:  # NaN fails this too
            return f"{label} must be above 0 and at most 1 (got {value})"
    elif field == "seed":
        highest = MAX_SEED - num_images + 1
        if not (random_seed and value == RANDOM_SEED) and not 0 <= value <= highest:
            return (f"{label} must be between 0 and {highest}" + (", or -1 for a random seed" if random_seed else "")
                    + f" (got {value})")
    elif field == "clip_skip":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{label} must be a whole number >= 1 (1 = no skip, 2 = penultimate layer; got {value!r})"
    else:
        raise ValueError(f"unknown request field {field!r}")
    return None


def denoising_problem(steps: int, strength: float, *, steps_name: str = "--steps", strength_name: str = "--strength",
                      counted: str = "steps", verb: str = "use") -> str | None:
    """What is wrong with an init-image request whose strength leaves no denoising step (``int(steps * strength)
    < 1``, diffusers' rule), naming the fewest steps that work; None when at least one step runs.

    Args:
        steps: the steps asked for (the model's when the request has none).
        strength: in (0, 1] (:func:`field_problem` checked it).
        steps_name, strength_name: how the message names the two settings (default: the CLI's flags; the server
            passes its request fields, quoted).
        counted: the word after the step count ("with 12 steps").
        verb: what to do with ``steps_name`` ("use --steps 20 or more"; the server's "send 'steps' 20 or more").

    Returns:
        The message, or None.
    """
    if int(steps * strength) >= 1:
        return None
    fewest = smallest_steps(strength)
    advice = (f"{verb} {steps_name} {fewest} or more, or a higher {strength_name}" if fewest <= MAX_STEPS
              else f"{verb} a higher {strength_name}")
    return (f"{strength_name} {strength:g} with {steps} {counted} runs no denoising step "
            f"(int({steps} x {strength:g}) = 0); {advice}")


def _prompt_problem(text: str, label: str) -> str | None:
    """A prompt's length and control characters (the message never quotes the prompt: it may be megabytes)."""
    if len(text) > MAX_PROMPT_CHARS:
        return (f"{label} is {len(text):,} characters long; at most {MAX_PROMPT_CHARS:,} are accepted (a text "
                "encoder reads only its first few hundred tokens)")
    if found := _CONTROL.search(text):
        code = ord(found.group())
        name = f" ({_CONTROL_NAMES[code]})" if code in _CONTROL_NAMES else ""
        return (f"{label} contains the control character U+{code:04X}{name} at character {found.start() + 1:,}; "
                "remove it (tabs and line breaks are allowed)")
    return None


def _validate_inputs(request: GenerationRequest) -> None:
    if request.task is not None and request.task not in TASKS:
        raise UsageError(f"unknown task {request.task!r}; one of {', '.join(TASKS)}")
    task = request.resolved_task
    if task != "txt2img" and request.image is None:
        raise UsageError(f"{task} needs an init image (--image)")
    if request.mask_alpha not in ("transparent", "opaque"):
        raise UsageError(f"mask_alpha must be 'transparent' or 'opaque' (got {request.mask_alpha!r})")
    if request.mask is not None and task != "inpaint":
        raise UsageError("--mask is for inpainting (dalle edit IMAGE PROMPT --mask MASK.png)")
    if request.strength is None:
        return
    if task == "txt2img":
        raise UsageError("--strength needs an init image (--image IN.png); text to image has no strength")
    if problem := field_problem("strength", request.strength):
        raise UsageError(problem)
    if request.steps is not None and (problem := denoising_problem(request.steps, request.strength)):
        raise UsageError(problem)


def validate_request(request: GenerationRequest) -> None:
    """Check a request before any model loads.

    Raises:
        UsageError: empty prompt (allowed for task "variation") or one that is not valid UTF-8, a prompt or
            negative prompt longer than :data:`MAX_PROMPT_CHARS` characters or holding a control character other
            than tab, line feed or carriage return (:func:`field_problem`), size not a
            multiple of 8 (naming the nearest valid sizes), a count, step number, guidance scale or seed out of
            range, a strength outside (0, 1] or one that leaves no denoising step (``int(steps * strength) < 1``,
            naming the fewest steps that work), a strength or mask without an init image, an unknown task.
    """
    if (not request.prompt or not request.prompt.strip()) and request.task != "variation":
        raise UsageError("the prompt is empty")
    _validate_inputs(request)
    for name, text in (("the prompt", request.prompt), ("--negative-prompt", request.negative_prompt)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes the terminal could not decode arrive as lone surrogates
            code = ord(text[exc.start])
            byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
            raise UsageError(f"{name} is not valid UTF-8 ({byte} at position {exc.start}); check the terminal's "
                             "encoding (LANG/LC_ALL)") from None
        if text and (problem := _prompt_problem(text, name)):
            raise UsageError(problem)
    for name, value in (("width", request.width), ("height", request.height)):
        if value is not None and (problem := field_problem(name, value)):
            raise UsageError(problem)
    if request.num_images < 1:
        raise UsageError(f"-n/--num-images must be at least 1 (got {request.num_images})")
    if request.batch_size is not None and request.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {request.batch_size})")
    for name, value in (("steps", request.steps), ("guidance", request.guidance_scale)):
        if value is not None and (problem := field_problem(name, value)):
            raise UsageError(problem)
    if request.clip_skip is not None and (problem := field_problem("clip_skip", request.clip_skip)):
        raise UsageError(problem)
    if request.seed is not None and (problem := field_problem("seed", request.seed, num_images=request.num_images)):
        raise UsageError(problem)
