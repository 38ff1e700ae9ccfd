"""What a ``dalle finetune`` run is asked to do, and every check that needs neither the data nor the weights.

:class:`FinetuneConfig` holds the options; :func:`validate` checks their values, :func:`check_output` the output
folder, :func:`check_model` that the model is one finetune trains (from ``model_index.json`` alone), and
:func:`latest_checkpoint_step` says where ``--resume`` would continue. Nothing here loads torch weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dallecli.errors import UsageError
from dallecli.images import prepare_output_folder
from dallecli.training.finetune_export import KOHYA_FILE, LORA_FILE, MODEL_FOLDER

MIXED_PRECISION = ("no", "bf16", "fp16")
NOT_SUPPORTED = ("is not supported by dalle finetune: it trains UNet pipelines with one text encoder "
                 "(Stable Diffusion 1.x/2.x-like, the embedded model)")


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
        """The output folder: ``output``, or ``<data folder name>-lora`` (``-finetune`` with ``full``) in the
        current folder."""
        if self.output is not None:
            return Path(self.output)
        name = Path(self.data_dir).resolve().name or "data"
        return Path.cwd() / f"{name}-{'finetune' if self.full else 'lora'}"


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
    subfolders = ["checkpoints"] + (["samples"] if config.sample_prompts else []) + ([MODEL_FOLDER] if config.full else [])
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
        raise UsageError(f"{resolved.name} ({index.get('_class_name')}) {NOT_SUPPORTED}")
    return resolved