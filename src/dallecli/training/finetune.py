"""Fine-tune a UNet pipeline on a folder of the user's images: LoRA (default) or full, resumable, distributed.

    dalle finetune ./photos --model shapes --output ./photos-lora --steps 200
    accelerate launch --num_processes 2 -m dallecli finetune ./photos --steps 200   # data-parallel

Steps of :func:`finetune` (nothing is printed here; progress goes through :class:`FinetuneHooks`):

1. check the options and every file of the data folder before anything loads (:mod:`dallecli.training.dataset`);
2. load the pipeline's components in float32 from safetensors;
3. load, convert, crop (and, with ``flip``, mirror) every image once, encode it with the frozen VAE, and
   encode every caption once with the text encoder when it is frozen: the training loop never runs the VAE
   or a frozen text encoder (random crops are drawn once per image, seeded; flips double the set);
4. add LoRA adapters (``peft``) to the UNet attention projections ``to_q, to_k, to_v, to_out.0`` (and to the
   text encoder's ``q/k/v/out_proj`` with ``train_text_encoder``), or unfreeze the whole UNet (``full``);
5. run the shared :class:`~dallecli.training.trainer.DenoiserTrainer` (accelerate, Min-SNR, atomic
   checkpoints, resume, stop at the first non-finite loss), rendering samples every ``sample_every`` steps;
6. write ``lora.safetensors`` (diffusers/PEFT keys, metadata in the header), optionally
   ``lora.kohya.safetensors``, or with ``full`` a pipeline folder ``model/`` whose ``training.json`` keeps the
   base model's generation defaults (steps and guidance; the training resolution as the size), read back by
   :func:`dallecli.engine.loading.recorded_defaults`; all atomically.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dallecli.atomic import place, staged_file, staged_folder, write_file
from dallecli.images import prepare_output_folder
from dallecli import __version__
from dallecli.errors import DatasetError, LoraError, UsageError
from dallecli.training.dataset import FolderScan, check_captions, scan_folder

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RESUME_ADVICE = "Free some space, then re-run with --resume"  # what to do when the disk fills up
LORA_FILE = "lora.safetensors"
KOHYA_FILE = "lora.kohya.safetensors"
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train, on what, and how.

    Attributes:
        data_dir: the folder of images and captions.
        output: where lora.safetensors, checkpoints/ and samples/ go (None: ``./<data folder name>-lora``).
        model: model name or folder as for ``dalle generate --model`` (None: the embedded model).
        revision, cache_dir: where a downloaded Hub model is, as for ``dalle download --revision/--cache-dir``.
        rank: LoRA rank r; alpha: LoRA alpha (None: equal to rank; the update is scaled by alpha/r).
        learning_rate: AdamW learning rate; steps: optimiser steps in total; batch_size: images per process
            per micro-batch; gradient_accumulation: micro-batches per optimiser step; seed: seeds everything.
        resolution: square training size in pixels, a multiple of 8 (None: the model's own size).
        center_crop: centre crop (else one random crop per image, drawn once from ``seed``).
        flip: also train on the horizontally mirrored images.
        caption: default caption for images without one; caption_prefix: put before every caption.
        allow_missing_captions: train images without a caption on the empty caption instead of stopping.
        train_text_encoder: also train the text encoder (LoRA, or fully with ``full``).
        full: train all UNet weights instead of a LoRA; the result is a pipeline folder ``model/``.
        mixed_precision: "no", "bf16" or "fp16" (fp16 needs CUDA); gradient_checkpointing: trade compute
            for memory.
        save_every: steps between checkpoints (0: only at the end); resume: continue from the latest one.
        sample_prompts: prompts rendered every ``sample_every`` steps (and at the end) with fixed seeds.
        export_kohya: also write the kohya/A1111 key layout.
        snr_gamma: Min-SNR-gamma loss weighting (None: plain MSE).
    """

    data_dir: Path
    output: Path | None = None
    model: str | None = None
    revision: str | None = None
    cache_dir: Path | None = None
    rank: int = 4
    alpha: float | None = None
    learning_rate: float = 1e-4
    steps: int = 500
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    resolution: int | None = None
    center_crop: bool = True
    flip: bool = False
    caption: str | None = None
    caption_prefix: str | None = None
    allow_missing_captions: bool = False
    train_text_encoder: bool = False
    full: bool = False
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    save_every: int = 0
    resume: bool = False
    sample_prompts: tuple[str, ...] = ()
    sample_every: int = 0
    export_kohya: bool = False
    snr_gamma: float | None = 5.0

    def output_dir(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        name = Path(self.data_dir).resolve().name or "data"
        return Path.cwd() / f"{name}-{'finetune' if self.full else 'lora'}"


@dataclass
class FinetuneHooks:
    """Callbacks for progress (all optional; called on the main process only).

    Attributes:
        scanned: the data folder was checked (before anything loads).
        stage: a stage begins, e.g. "encoding 6 images".
        notice: something the user should know that does not stop the run (``--resume`` with no checkpoint,
            a ``--batch-size`` larger than the data set).
        resumed: training continues from this checkpoint step.
        started: the loop starts at this step (0, or the resumed step).
        step: after every optimiser step (:class:`~dallecli.training.trainer.StepReport`).
        sampled: sample images were written for this step.
        saved: a checkpoint was written for this step.
    """

    scanned: Callable[[FolderScan], None] | None = None
    stage: Callable[[str], None] | None = None
    notice: Callable[[str], None] | None = None
    resumed: Callable[[int], None] | None = None
    started: Callable[[int], None] | None = None
    step: Callable[[object], None] | None = None
    sampled: Callable[[int, list[Path]], None] | None = None
    saved: Callable[[int], None] | None = None


@dataclass
class FinetuneResult:
    """What a finished run wrote and how fast it went (``steps_per_second`` over the steps run now)."""

    output: Path
    lora: Path | None
    kohya: Path | None
    model: Path | None
    base_model: str
    steps: int
    resumed_from: int
    steps_run: int
    loss: float
    seconds: float
    steps_per_second: float
    images: int
    training_examples: int
    resolution: int
    processes: int
    samples: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["loss"] = self.loss if math.isfinite(self.loss) else None
        return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "samples" else v)
                for k, v in data.items()}


def validate(config: FinetuneConfig) -> None:
    """Check option values before anything loads.

    Raises:
        UsageError: naming the option and the bad value.
    """
    at_least_one = "a whole number, at least 1"
    checks = [  # (option, value, whether it is in range, the range)
        ("--steps", config.steps, config.steps >= 1, at_least_one),
        ("--rank", config.rank, config.rank >= 1, at_least_one),
        ("--batch-size", config.batch_size, config.batch_size >= 1, at_least_one),
        ("--gradient-accumulation", config.gradient_accumulation, config.gradient_accumulation >= 1, at_least_one),
        ("--learning-rate", config.learning_rate, config.learning_rate > 0 and math.isfinite(config.learning_rate),
         "a number greater than 0, e.g. 1e-4"),
        ("--save-every", config.save_every, config.save_every >= 0, "0 (only at the end) or more"),
        ("--sample-every", config.sample_every, config.sample_every >= 0, "0 (no samples) or more"),
        ("--alpha", config.alpha, config.alpha is None or (config.alpha > 0 and math.isfinite(config.alpha)),
         "a number greater than 0"),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise UsageError(f"{name} must be {allowed} (got {value:g})" if isinstance(value, float)
                             else f"{name} must be {allowed} (got {value})")
    if config.resolution is not None and (config.resolution < 8 or config.resolution % 8):
        raise UsageError(f"--resolution {config.resolution} must be a multiple of 8, at least 8 (e.g. 512 or 768)")
    if config.mixed_precision not in MIXED_PRECISION:
        raise UsageError(f"--mixed-precision {config.mixed_precision!r}: use one of {', '.join(MIXED_PRECISION)}")
    if config.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")


def check_output(config: FinetuneConfig) -> Path:
    """Check, before the data is scanned and anything loads, that the output folder takes what the run writes:
    the folder can be made or written (:func:`dallecli.images.prepare_output_folder`, which writes a probe
    file into a folder that exists), the subfolders it writes into (``checkpoints/``, ``samples/``) are
    writable folders where they exist, and the result's names (``lora.safetensors``, ``model/``) are free for
    it (a folder where a file goes, or the reverse, failed only after the training).

    Returns:
        The output folder (not created).

    Raises:
        UsageError: naming ``--output`` and what is in the way.
    """
    output = prepare_output_folder(config.output_dir(), "--output")
    subfolders = ["checkpoints"] + (["samples"] if config.sample_prompts else []) + (["model"] if config.full else [])
    for name in subfolders:
        if (output / name).exists() or (output / name).is_symlink():
            prepare_output_folder(output / name, "--output")
    files = [] if config.full else [LORA_FILE] + ([KOHYA_FILE] if config.export_kohya else [])
    for name in files:
        if (output / name).is_dir():
            raise UsageError(f"--output {output}: {output / name} is a folder, where the run writes a file; "
                             "move it or choose another --output")
    return output


def latest_checkpoint_step(config: FinetuneConfig) -> int | None:
    """The step of the newest complete checkpoint in the run's output folder (what ``--resume`` continues
    from), or None when there is none. Reads folder names only."""
    from dallecli.training.checkpoint import PREFIX, list_checkpoints

    found = list_checkpoints(config.output_dir() / "checkpoints")
    return int(found[-1].name.removeprefix(PREFIX)) if found else None


def check_model(model: str | None, revision: str | None = None, cache_dir: Path | None = None):
    """Resolve ``model`` and check from its ``model_index.json`` alone (no weights read) that dalle finetune
    trains it.

    Returns:
        The :class:`~dallecli.store.resolve.ResolvedModel`.

    Raises:
        ModelNotFoundError: not downloaded (the message names the ``dalle download`` command).
        UsageError: a single-file checkpoint, or a pipeline without one UNet and one text encoder.
    """
    from dallecli.store.download import pipeline_components
    from dallecli.store.resolve import resolve_model

    resolved = resolve_model(model, cache_dir=cache_dir, revision=revision)
    if resolved.single_file:
        raise UsageError(f"dalle finetune needs a diffusers folder or a downloaded model; {resolved.name} is a "
                         "single-file checkpoint (dalle generate takes those)")
    index = json.loads((resolved.path / "model_index.json").read_text(encoding="utf-8"))
    loaded = set(pipeline_components(index))
    if "unet" not in loaded or {"text_encoder_2", "text_encoder_3", "transformer"} & loaded:
        raise UsageError(f"{resolved.name} ({index.get('_class_name')}) is not supported by dalle finetune: it trains "
                         "UNet pipelines with one text encoder (Stable Diffusion 1.x/2.x-like, the embedded model)")
    return resolved


def _emit(hook, *args) -> None:
    """Call ``hook`` on the main process only (told by the launcher's RANK, so nothing heavy is imported)."""
    if hook is not None and int(os.environ.get("RANK", "0")) == 0:
        hook(*args)


def process_state():
    """accelerate's process state, created before the trainer's ``Accelerator`` so that a CPU-only launch
    with several processes (``accelerate launch --multi_gpu`` with ``ACCELERATE_USE_CPU=1``, or ``torchrun``)
    becomes data-parallel over gloo instead of N independent runs."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (distributed and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def header_metadata(**values) -> dict[str, str]:
    """Metadata for a safetensors header, which holds strings only: numbers as ``str``/``:g``, booleans as
    "true"/"false", None as "".

    Raises:
        TypeError: a value that is not a string, number, boolean or None (a fault of the caller).
    """
    header = {}
    for key, value in values.items():
        if value is None:
            header[key] = ""
        elif isinstance(value, bool):
            header[key] = str(value).lower()
        elif isinstance(value, float):
            header[key] = f"{value:g}"
        elif isinstance(value, (int, str)):
            header[key] = str(value)
        else:
            raise TypeError(f"safetensors metadata {key!r} must be a string or a number, not {type(value).__name__}")
    return header


def _atomic_save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with staged_file(path.parent, ".safetensors", what=str(path), advice=RESUME_ADVICE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        place(tmp, path)


def load_components(model: str | None, revision: str | None = None, cache_dir: Path | None = None):
    """Resolve ``model`` and load its pipeline in float32 on the CPU, fresh (not the Engine's cached copy).

    Returns:
        ``(resolved, pipe)``.

    Raises:
        ModelNotFoundError, UnsafeWeightsError, CorruptWeightsError: as for ``dalle generate``.
        UsageError: the pipeline has no UNet/VAE/text encoder of the supported kind.
    """
    from dallecli.engine.loading import pretrained_kwargs, quiet_libraries
    from dallecli.weightfiles import verify_folder

    resolved = check_model(model, revision, cache_dir)
    verify_folder(resolved.path)
    quiet_libraries()
    from diffusers import DiffusionPipeline

    preferred = (resolved.spec.variant if resolved.spec else None) or "fp16"
    pipe = DiffusionPipeline.from_pretrained(resolved.path, **pretrained_kwargs(resolved.path, "float32", preferred))
    pipe.set_progress_bar_config(disable=True)
    missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer") if getattr(pipe, n, None) is None]
    if missing:
        raise UsageError(f"{resolved.name} ({type(pipe).__name__}) is not supported by dalle finetune: it trains "
                         "UNet pipelines with one text encoder (Stable Diffusion 1.x/2.x-like, the embedded model)")
    return resolved, pipe


def _encode(pipe, scan: FolderScan, config: FinetuneConfig, resolution: int, device, cache_text: bool):
    """Load every image once and encode it: returns (latents (N, C, h, w), ids (N, L), hidden (N, L, D) or None,
    empty ids (L,), empty hidden (L, D) or None, captions)."""
    import torch
    from PIL import Image

    from dallecli.engine.inputs import load_rgb
    from dallecli.training.dataset import image_tensor, resize_and_crop

    rng = random.Random(config.seed)
    pixels, captions = [], []
    for example in scan.examples:
        image = resize_and_crop(load_rgb(example.path), resolution, config.center_crop, rng)
        variants = [image] + ([image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if config.flip else [])
        for variant in variants:
            pixels.append(image_tensor(variant))  # (3, H, W) in [-1, 1]
            captions.append(example.caption or "")
    vae, tokenizer, text_encoder = pipe.vae, pipe.tokenizer, pipe.text_encoder
    vae.to(device)
    scaling = getattr(vae.config, "scaling_factor", 1.0) or 1.0
    chunks = []
    with torch.no_grad():
        for batch in torch.stack(pixels).split(8):  # (b, 3, H, W)
            encoded = vae.encode(batch.to(device))
            latent = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
            chunks.append((latent * scaling).float().cpu())
    latents = torch.cat(chunks)  # (N, C, H/f, W/f)
    vae.to("cpu")
    max_length = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else 77
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt").input_ids  # (N, L)
    empty = tokenizer([""], padding="max_length", max_length=max_length, return_tensors="pt").input_ids[0]
    hidden = empty_hidden = None
    if cache_text:
        text_encoder.to(device)
        with torch.no_grad():
            hidden = torch.cat([text_encoder(b.to(device))[0].float().cpu() for b in ids.split(16)])  # (N, L, D)
            empty_hidden = text_encoder(empty[None].to(device))[0][0].float().cpu()  # (L, D)
    return latents, ids, hidden, empty, empty_hidden, captions


def _add_lora(pipe, config: FinetuneConfig) -> list:
    from peft import LoraConfig

    alpha = config.alpha if config.alpha is not None else config.rank
    pipe.unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=UNET_TARGETS))
    if config.train_text_encoder:
        # peft directly, not transformers' ``add_adapter``: transformers 5 refuses every peft release before
        # 0.22 there, although peft's own injection works with them. ``peft_config`` is what
        # ``get_peft_model_state_dict`` and diffusers' LoRA saving read.
        from peft import inject_adapter_in_model

        te_config = LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                               target_modules=TEXT_ENCODER_TARGETS)
        inject_adapter_in_model(te_config, pipe.text_encoder)
        pipe.text_encoder.peft_config = {"default": te_config}
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    if config.train_text_encoder:
        params += [p for p in pipe.text_encoder.parameters() if p.requires_grad]
    if not params:
        raise LoraError("the model has no to_q/to_k/to_v/to_out.0 attention projections to put a LoRA on")
    return params


def lora_state_dicts(pipe, scale: float, train_text_encoder: bool) -> tuple[dict, dict]:
    """The trained LoRA as PEFT-format state dicts ``(unet, text_encoder)`` with ``alpha/r`` folded into
    ``lora_B``, so that loaders that take alpha = r (diffusers without metadata, kohya alpha = rank) apply
    exactly what was trained."""
    from peft.utils import get_peft_model_state_dict

    def folded(model):
        return {k: (v * scale if ".lora_B." in k else v).detach().cpu().contiguous()
                for k, v in get_peft_model_state_dict(model).items()}

    return folded(pipe.unet), (folded(pipe.text_encoder) if train_text_encoder else {})


def write_lora(pipe, folder: Path, metadata: dict[str, str], scale: float, train_text_encoder: bool,
               kohya: bool) -> tuple[Path, Path | None]:
    """Write ``lora.safetensors`` (diffusers keys, via ``StableDiffusionPipeline.save_lora_weights``) and
    optionally ``lora.kohya.safetensors``, atomically, with ``metadata`` in the header."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    unet_sd, text_sd = lora_state_dicts(pipe, scale, train_text_encoder)
    header = {"format": "pt", **metadata}
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder), unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(text_sd) if text_sd else None,
        weight_name=LORA_FILE, safe_serialization=True,
        save_function=lambda weights, filename: _atomic_save_safetensors(weights, Path(filename), header),
    )
    kohya_path = None
    if kohya:
        peft_sd = {f"unet.{k}": v for k, v in unet_sd.items()}
        peft_sd.update({f"text_encoder.{k}": v for k, v in text_sd.items()})
        kohya_path = folder / KOHYA_FILE
        _atomic_save_safetensors(convert_state_dict_to_kohya(peft_sd), kohya_path,
                                 dict(header, ss_network_dim=metadata["rank"], ss_network_alpha=metadata["rank"]))
    return folder / LORA_FILE, kohya_path


def render_samples(pipe, prompts, seed: int, resolution: int, defaults: dict, folder: Path, step: int,
                   model_name: str) -> list[Path]:
    """Render one image per prompt with seed ``seed`` into ``folder/step-NNNNNNN/`` (PNG with metadata)."""
    import torch

    from dallecli.images import write_png

    target = folder / f"step-{step:07d}"
    was_training = pipe.unet.training, pipe.text_encoder.training
    pipe.unet.eval()
    pipe.text_encoder.eval()
    written = []
    try:
        for index, prompt in enumerate(prompts):
            with torch.no_grad():
                image = pipe(prompt, num_inference_steps=defaults["steps"], guidance_scale=defaults["guidance"],
                             width=resolution, height=resolution, output_type="pil",
                             generator=torch.Generator("cpu").manual_seed(seed)).images[0]
            settings = {"prompt": prompt, "negative_prompt": None, "seed": seed, "steps": defaults["steps"],
                        "guidance_scale": float(defaults["guidance"]), "width": resolution, "height": resolution,
                        "model": model_name, "training_step": step, "version": __version__}
            written.append(write_png(image, target, settings, "Euler", index=index))
    finally:
        pipe.unet.train(was_training[0])
        pipe.text_encoder.train(was_training[1])
    return written


def finetune(config: FinetuneConfig, hooks: FinetuneHooks | None = None) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data_dir`` and write the result into the output folder.

    Run it as is on one device, or under ``accelerate launch`` for data parallelism (every process encodes
    the data, takes its own slice of each global batch; only the main process writes files).

    Args:
        config: what to train and how.
        hooks: progress callbacks.

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        UsageError: a bad option value, an output folder that cannot be written (:func:`check_output`), a model
            finetune does not train; the output already holds checkpoints and ``resume`` is off. All before the
            data is scanned.
        DatasetError: no usable image, or missing captions (before any model loads).
        ModelNotFoundError: the model is not downloaded (before the data is scanned).
        UnsafeWeightsError, CorruptWeightsError: the model cannot be loaded.
        CheckpointError: ``resume`` with a checkpoint made for another model or rank.
        TrainingDivergedError: the loss became NaN/Inf; names the step; nothing is written after it.
    """
    hooks = hooks or FinetuneHooks()
    # 1. every check that needs neither the data nor the weights: options, output folder, model, checkpoints
    validate(config)
    output = check_output(config)
    check_model(config.model, config.revision, config.cache_dir)
    checkpoints = output / "checkpoints"
    from dallecli.training.checkpoint import list_checkpoints

    existing = list_checkpoints(checkpoints)
    if existing and not config.resume:
        raise UsageError(f"{output} already holds checkpoints (latest {existing[-1].name}); add --resume to "
                         "continue that run, or choose another --output")
    if config.resume and not existing:
        _emit(hooks.notice, f"--resume: no checkpoint in {checkpoints}; starting from step 0")
    scan = scan_folder(config.data_dir, config.caption, config.caption_prefix)
    _emit(hooks.scanned, scan)
    check_captions(scan, config.allow_missing_captions)
    examples = len(scan.examples) * (2 if config.flip else 1)
    if config.batch_size > examples:  # batches are drawn with replacement: it runs, repeating images
        _emit(hooks.notice, f"--batch-size {config.batch_size} is larger than the {examples} training example(s): "
                            "every batch repeats images; a smaller --batch-size (or more images) trains the same "
                            "for less compute")

    import torch
    from diffusers import DDPMScheduler

    from dallecli.engine.loading import GENERATION_DEFAULTS_KEY, default_size, pipeline_class_name, recorded_defaults
    from dallecli.store.registry import defaults_for
    from dallecli.training.trainer import DenoiserTrainer, EncodedData, StepReport, TrainSettings

    state = process_state()
    resolved, pipe = load_components(config.model, config.revision, config.cache_dir)
    if resolved.notice:
        _emit(hooks.stage, resolved.notice)
    resolution = config.resolution or default_size(resolved.path) or 512
    if config.resolution is None and resolution % 8:
        raise UsageError(f"cannot tell a training size for {resolved.name}; give --resolution")
    cache_text = not config.train_text_encoder
    _emit(hooks.stage, f"encoding {len(scan.examples)} image(s) at {resolution}x{resolution}"
                       + (" (and their mirror images)" if config.flip else ""))
    latents, ids, hidden, empty, empty_hidden, _ = _encode(pipe, scan, config, resolution, state.device, cache_text)
    data = EncodedData(latents=latents, input_ids=ids, empty_ids=empty, hidden_states=hidden,
                       empty_hidden=empty_hidden)

    # 4. what to train
    torch.manual_seed(config.seed)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    for module in (unet, text_encoder, pipe.vae):
        module.requires_grad_(False)
    if config.full:
        unet.requires_grad_(True)
        if config.train_text_encoder:
            text_encoder.requires_grad_(True)
        parameters = [p for p in unet.parameters()] + (list(text_encoder.parameters()) if config.train_text_encoder else [])
    else:
        parameters = _add_lora(pipe, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    # 5. train
    output.mkdir(parents=True, exist_ok=True)
    settings = TrainSettings(
        steps=config.steps, batch_size=config.batch_size, gradient_accumulation=config.gradient_accumulation,
        learning_rate=config.learning_rate, seed=config.seed, mixed_precision=config.mixed_precision,
        snr_gamma=config.snr_gamma, save_every=config.save_every, weight_decay=1e-2 if config.full else 0.0,
    )
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    trainer = DenoiserTrainer(unet, text_encoder, noise_scheduler, data, settings, parameters,
                              checkpoint_dir=checkpoints)
    resumed = trainer.resume() if config.resume else 0
    if resumed:
        _emit(hooks.resumed, resumed)
    defaults = ((None if resolved.spec else recorded_defaults(resolved.path))  # a --full model's own, as generate
                or defaults_for(resolved.spec, pipeline_class_name(resolved.path), resolution))
    samples: list[Path] = []
    sampling = [0.0]  # seconds spent rendering samples, left out of steps/s

    def on_step(report: StepReport) -> None:
        if hooks.step:
            hooks.step(report)
        every = config.sample_every
        if config.sample_prompts and every and (report.step % every == 0 or report.step == report.total):
            began = time.perf_counter()
            paths = render_samples(pipe, config.sample_prompts, config.seed, resolution, defaults,
                                   output / "samples", report.step, resolved.name)
            samples.extend(paths)
            sampling[0] += time.perf_counter() - began
            if hooks.sampled:
                hooks.sampled(report.step, paths)

    # the file header, built before step 1: a value safetensors refuses must not fail after the training
    alpha = config.alpha if config.alpha is not None else config.rank
    metadata = header_metadata(
        base_model=resolved.name, base_model_revision=resolved.revision or "", rank=config.rank, alpha=alpha,
        steps=config.steps, resolution=resolution, images=len(scan.examples), tool="dallecli",
        tool_version=__version__, learning_rate=config.learning_rate, seed=config.seed,
        train_text_encoder=config.train_text_encoder, target_modules=",".join(UNET_TARGETS),
        alpha_folded_into_weights=True,
    )
    _emit(hooks.started, trainer.step)
    result = trainer.run(on_step=on_step, on_save=hooks.saved)
    train_seconds = max(result.seconds - sampling[0], 1e-9)

    # 6. write the result (main process only; nothing is reached when the loss diverged)
    lora_path = kohya_path = model_path = None
    if state.is_main_process:
        if config.full:
            model_path = output / "model"
            with staged_folder(model_path, what=f"the model in {output}", advice=RESUME_ADVICE) as staging:
                pipe.save_pretrained(staging, safe_serialization=True)
                # the base model's generation defaults travel with the model (a folder has no registry entry)
                record = {**metadata, GENERATION_DEFAULTS_KEY: {"steps": defaults["steps"], "guidance": defaults[
                    "guidance"], "width": resolution, "height": resolution}}
                (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        else:
            lora_path, kohya_path = write_lora(pipe, output, metadata, alpha / config.rank,
                                               config.train_text_encoder, config.export_kohya)
    state.wait_for_everyone()
    steps_run = result.steps - result.resumed_from
    summary = FinetuneResult(
        output=output, lora=lora_path, kohya=kohya_path, model=model_path, base_model=resolved.name,
        steps=result.steps, resumed_from=result.resumed_from, steps_run=steps_run, loss=result.loss,
        seconds=round(result.seconds, 3), steps_per_second=round(steps_run / train_seconds, 4) if steps_run else 0.0,
        images=len(scan.examples), training_examples=len(data), resolution=resolution,
        processes=state.num_processes, samples=samples,
    )
    if state.is_main_process:
        write_file(output / "training.json", json.dumps(
            {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
             "result": summary.to_dict()}, indent=2) + "\n")
    return summary


__all__ = ["FinetuneConfig", "FinetuneHooks", "FinetuneResult", "finetune", "latest_checkpoint_step", "validate",
           "DatasetError"]
