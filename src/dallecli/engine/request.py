"""What a generation asks for (:class:`GenerationRequest`) and what one image was made with (:class:`ImageSettings`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from dallecli.errors import UsageError

MAX_SEED = 2**32 - 1
RANDOM_SEED = -1  # AUTOMATIC1111's way to ask for a random seed; the seed drawn is recorded
MAX_STEPS = 1000  # the training timesteps of every supported schedule; schedulers refuse more steps
MAX_GUIDANCE = 100.0  # far above any useful guidance scale (1-20); catches typos, inf and NaN


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

    def with_defaults(self, defaults: dict) -> GenerationRequest:
        """Fill ``None`` fields from ``{"steps", "guidance", "width", "height"}``."""
        return replace(
            self,
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

    def to_dict(self) -> dict:
        data = asdict(self)
        for optional in ("clip_skip", "unknown_words"):  # written only when they say something
            if not data[optional]:
                del data[optional]
        return data


def nearest_multiples(value: int, base: int = 8) -> tuple[int, int]:
    """The multiples of ``base`` just below and just above ``value`` (pixels)."""
    low = max(base, value - value % base)
    return low, low + base


def validate_request(request: GenerationRequest) -> None:
    """Check a request before any model loads.

    Raises:
        UsageError: empty prompt or one that is not valid UTF-8, size not a multiple of 8 (naming the nearest valid sizes), or a count,
            step number, guidance scale or seed out of range.
    """
    if not request.prompt or not request.prompt.strip():
        raise UsageError("the prompt is empty")
    for name, text in (("the prompt", request.prompt), ("--negative-prompt", request.negative_prompt)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes the terminal could not decode arrive as lone surrogates
            code = ord(text[exc.start])
            byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
            raise UsageError(f"{name} is not valid UTF-8 ({byte} at position {exc.start}); check the terminal's "
                             "encoding (LANG/LC_ALL)") from None
    for name, value in (("--width", request.width), ("--height", request.height)):
        if value is None:
            continue
        if value < 8 or value > 8192:
            raise UsageError(f"{name} {value} is out of range (8-8192 pixels)")
        if value % 8:
            low, high = nearest_multiples(value)
            raise UsageError(f"{name} {value} is not a multiple of 8; the nearest valid sizes are {low} and {high}")
    if request.num_images < 1:
        raise UsageError(f"-n/--num-images must be at least 1 (got {request.num_images})")
    if request.batch_size is not None and request.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {request.batch_size})")
    if request.steps is not None and not 1 <= request.steps <= MAX_STEPS:
        raise UsageError(f"--steps must be between 1 and {MAX_STEPS}, the diffusion's training timesteps "
                         f"(got {request.steps})")
    if request.guidance_scale is not None and not 0 <= request.guidance_scale <= MAX_GUIDANCE:
        # NaN fails this comparison too: it would be written into metadata and JSON
        raise UsageError(f"--guidance must be between 0 and {MAX_GUIDANCE:g} (got {request.guidance_scale})")
    if request.clip_skip is not None and (isinstance(request.clip_skip, bool) or not isinstance(request.clip_skip, int)
                                          or request.clip_skip < 1):
        raise UsageError(f"--clip-skip must be a whole number >= 1 (1 = no skip, 2 = penultimate layer; "
                         f"got {request.clip_skip!r})")
    if request.seed not in (None, RANDOM_SEED) and not 0 <= request.seed <= MAX_SEED - request.num_images + 1:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED - request.num_images + 1}, or -1 for a random "
                         f"seed (got {request.seed})")
