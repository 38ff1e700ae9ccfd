"""Fine-tune a UNet pipeline on a folder of the user's images: LoRA (default) or full, resumable, distributed.

    dalle finetune ./photos --model shapes --output ./photos-lora --steps 200
    accelerate launch --num_processes 2 -m dallecli finetune ./photos --steps 200   # data-parallel

This module runs the steps; each has its own module. Steps of :func:`finetune` (nothing is printed here;
progress goes through :class:`FinetuneHooks`):

1. check the options, the output folder and the model (:mod:`~dallecli.training.finetune_config`), then every
   file of the data folder (:mod:`dallecli.training.dataset`), before anything loads;
2. load the pipeline's components in float32 from safetensors (:mod:`~dallecli.training.finetune_model`);
3. load, convert, crop (and, with ``flip``, mirror) every image once, encode it with the frozen VAE, and
   encode every caption once with the text encoder when it is frozen (:mod:`~dallecli.training.finetune_data`):
   the training loop never runs the VAE or a frozen text encoder (random crops are drawn once per image,
   seeded; flips double the set);
4. add LoRA adapters (``peft``) to the UNet attention projections ``to_q, to_k, to_v, to_out.0`` (and to the
   text encoder's ``q/k/v/out_proj`` with ``train_text_encoder``), or unfreeze the whole UNet (``full``)
   (:mod:`~dallecli.training.finetune_model`);
5. run the shared :class:`~dallecli.training.trainer.DenoiserTrainer` (accelerate, Min-SNR, atomic
   checkpoints, resume, stop at the first non-finite loss), rendering samples every ``sample_every`` steps
   (:mod:`~dallecli.training.finetune_samples`);
6. write ``lora.safetensors`` (diffusers/PEFT keys, metadata in the header), optionally
   ``lora.kohya.safetensors``, or with ``full`` a pipeline folder ``model/`` whose ``training.json`` keeps the
   base model's generation defaults (steps and guidance; the training resolution as the size), read back by
   :func:`dallecli.engine.loading.recorded_defaults`; all atomically (:mod:`~dallecli.training.finetune_export`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dallecli import __version__
from dallecli.atomic import write_file
from dallecli.errors import UsageError
from dallecli.training.dataset import FolderScan, check_captions, scan_folder
from dallecli.training.finetune_config import FinetuneConfig, check_model, check_output, validate
from dallecli.training.finetune_export import header_metadata, write_full_model, write_lora
from dallecli.training.finetune_model import UNET_TARGETS, load_components, trainable_parameters
from dallecli.training.finetune_samples import render_samples


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
    # 1. every check that needs neither the data nor the weights (options, output folder, model, checkpoints),
    #    then the data folder
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

    from diffusers import DDPMScheduler

    from dallecli.engine.loading import recorded_defaults
    from dallecli.weightfiles import default_size, pipeline_class_name
    from dallecli.store.registry import defaults_for
    from dallecli.training.finetune_data import encode_examples
    from dallecli.training.trainer import DenoiserTrainer, StepReport, TrainSettings

    # 2. the model, a fresh float32 copy; 3. the data, encoded once
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
    data = encode_examples(pipe, scan, config, resolution, state.device, cache_text)

    # 4. what to train
    parameters = trainable_parameters(pipe, config)

    # 5. train
    output.mkdir(parents=True, exist_ok=True)
    settings = TrainSettings(
        steps=config.steps, batch_size=config.batch_size, gradient_accumulation=config.gradient_accumulation,
        learning_rate=config.learning_rate, seed=config.seed, mixed_precision=config.mixed_precision,
        snr_gamma=config.snr_gamma, save_every=config.save_every, weight_decay=1e-2 if config.full else 0.0,
    )
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    trainer = DenoiserTrainer(pipe.unet, pipe.text_encoder, noise_scheduler, data, settings, parameters,
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
            model_path = write_full_model(pipe, output, metadata, defaults, resolution)
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


__all__ = ["FinetuneConfig", "FinetuneHooks", "FinetuneResult", "finetune"]