"""The denoiser training loop shared by full training (the embedded model) and LoRA fine-tuning.

The loss is the standard latent-diffusion objective (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"): noise clean latents to a random timestep with the noise scheduler, predict
the noise (epsilon) or the velocity (v, Salimans & Ho 2022) with the UNet conditioned on the text
encoder's hidden states, and minimise the mean squared error, optionally weighted by Min-SNR-gamma
(Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").

Data come pre-encoded (:class:`EncodedData`: VAE latents and token ids), which is the main speed lever on
small hardware. Distribution and mixed precision go through ``accelerate``: every process draws the same
index stream (one generator seeded alike on every rank) and takes its own slice of it, and draws its noise,
timesteps and caption-dropout mask from a generator of its own (:func:`rank_seed`), so N processes train on
N different batches; a run is deterministic for a given seed and world size, and resumes each rank's stream.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dallecli.errors import CheckpointError, TrainingDivergedError
from dallecli.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings.

    Attributes:
        steps: optimiser steps in total (a resumed run stops at the same total).
        batch_size: samples per process per micro-batch.
        gradient_accumulation: micro-batches per optimiser step.
        learning_rate: AdamW peak learning rate.
        warmup_steps: linear warm-up steps, then constant.
        weight_decay: AdamW weight decay.
        seed: seeds initial RNG states, the data order and the noise.
        mixed_precision: "no", "bf16" or "fp16" (accelerate's names).
        caption_dropout: probability of replacing a caption by the empty one (trains classifier-free guidance).
        ema_max_decay: keep an exponential moving average of the trained weights with this maximal decay
            (warm-up as in diffusers' ``EMAModel``), or None.
        snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
            Weighting Strategy"), or None for plain MSE.
        snr_floor: with ``snr_gamma``, the per-sample weight in x0 terms never drops below this: Min-SNR gives
            the noisiest timesteps almost no weight (none at zero terminal SNR), yet that is where the layout of
            an image is decided from the prompt alone. A floor of 1 is the "truncated SNR" weighting of
            Salimans & Ho 2022 ("Progressive Distillation for Fast Sampling of Diffusion Models"). None: no floor.
        high_noise_fraction: share (0-1) of the samples whose timestep is drawn from the noisiest fifth of the
            schedule instead of uniformly (as diffusers' ``timestep_bias_strategy="later"``); 0 keeps uniform.
        max_grad_norm: gradient clipping norm.
        save_every: steps between checkpoints (0: only at the end).
    """

    steps: int
    batch_size: int = 32
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    seed: int = 0
    mixed_precision: str = "no"
    caption_dropout: float = 0.0
    ema_max_decay: float | None = None
    snr_gamma: float | None = 5.0
    snr_floor: float | None = None
    high_noise_fraction: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0


@dataclass
class EncodedData:
    """A training set after the frozen VAE and tokenizer have been applied once.

    Attributes:
        latents: (N, C, h, w) float32 latents already multiplied by the VAE's scaling factor.
        input_ids: (N, L) int64 token ids, padded to the tokenizer's ``model_max_length`` L.
        empty_ids: (L,) token ids of the empty caption (used for caption dropout).
        hidden_states: optional (N, L, D) text-encoder outputs cached once when the text encoder is frozen;
            when given, the trainer conditions on them instead of running the text encoder on ``input_ids``.
        empty_hidden: (L, D) hidden states of the empty caption (caption dropout with ``hidden_states``).
    """

    latents: torch.Tensor
    input_ids: torch.Tensor
    empty_ids: torch.Tensor
    hidden_states: torch.Tensor | None = None
    empty_hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]


LOSS_BETA = 0.98  # decay of the displayed loss's moving average (about the last 50 steps)


class LossAverage:
    """The displayed loss: an exponential moving average of the step losses with Adam's bias correction
    (Kingma & Ba 2015, "Adam: A Method for Stochastic Optimization", section 3).

    ``ema_t = beta * ema_(t-1) + (1 - beta) * loss_t`` from ``ema_0 = 0``, shown as ``ema_t / (1 - beta**t)``: step
    1 shows its own loss, and the average neither starts at one noisy step's value nor climbs for ~1/(1-beta)
    steps as an uncorrected average from 0 would (which looks like divergence). ``t`` counts the steps averaged,
    so the value continues exactly across a resume (:meth:`state`, :meth:`load`).
    """

    def __init__(self, beta: float = LOSS_BETA):
        self.beta, self.ema, self.count = beta, 0.0, 0

    def update(self, loss: float) -> float:
        """Add one step's loss; returns the corrected average."""
        self.ema = self.beta * self.ema + (1 - self.beta) * loss
        self.count += 1
        return self.value

    @property
    def value(self) -> float:
        """The bias-corrected average, NaN before the first step."""
        return self.ema / (1 - self.beta ** self.count) if self.count else math.nan

    def state(self) -> dict[str, float]:
        """What a checkpoint stores: ``{"beta", "ema", "count"}``."""
        return {"beta": self.beta, "ema": self.ema, "count": self.count}

    def load(self, state: dict | None) -> None:
        """Restore :meth:`state`; None (a checkpoint from before it was stored) starts the average afresh."""
        if state:
            self.beta, self.ema, self.count = float(state["beta"]), float(state["ema"]), int(state["count"])


@dataclass
class StepReport:
    """What the loop reports after each optimiser step (``step`` is 1-based, ``loss`` the bias-corrected moving
    average of the step losses, :class:`LossAverage`)."""

    step: int
    total: int
    loss: float


@dataclass
class TrainResult:
    """Summary of a finished run: first step run (0 unless resumed), steps, final smoothed loss
    (:class:`LossAverage`), wall time (s)."""

    resumed_from: int
    steps: int
    loss: float
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s noise generator (noise, timesteps, caption dropout): distinct per rank,
    fixed by the run's ``seed``. The index stream keeps ``seed`` itself, shared by all ranks."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % 2**63


HIGH_NOISE_START = 0.8  # "noisiest fifth": timesteps from 0.8 T to T - 1


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, floor: float | None = None) -> torch.Tensor:
    """Min-SNR-gamma loss weights (B,) for ``timesteps`` (B,), matching the scheduler's prediction type.

    In x0 terms the weight is ``min(SNR, gamma)``, raised to ``floor`` where given; it is divided by
    ``SNR + 1`` for v-prediction and by ``SNR`` for epsilon-prediction, whose losses carry those factors.

    Raises:
        ValueError: ``floor`` with epsilon-prediction (the weight would be unbounded at zero SNR).
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod).clamp(min=1e-8)
    weight = torch.minimum(snr, torch.full_like(snr, gamma))
    if floor is not None:
        if scheduler.config.prediction_type != "v_prediction":
            raise ValueError("snr_floor needs a v-prediction model")
        weight = weight.clamp(min=floor)
    if scheduler.config.prediction_type == "v_prediction":
        return weight / (snr + 1)
    return weight / snr.clamp(min=1e-8)


def sample_timesteps(total: int, count: int, high_noise_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` training timesteps (int64) in [0, total): uniform, except that a ``high_noise_fraction``
    share of them (each sample independently) comes uniformly from the noisiest fifth, [0.8 total, total)."""
    timesteps = torch.randint(0, total, (count,), generator=generator)
    if high_noise_fraction > 0:
        start = int(total * HIGH_NOISE_START)
        noisiest = torch.randint(start, total, (count,), generator=generator)
        chosen = torch.rand(count, generator=generator) < high_noise_fraction
        timesteps = torch.where(chosen, noisiest, timesteps)
    return timesteps


class DenoiserTrainer:
    """Trains a UNet (and optionally its text encoder) on :class:`EncodedData`.

    Args:
        unet: a ``UNet2DConditionModel`` (or any module with the same call signature).
        text_encoder: a ``transformers`` text encoder whose first output is (B, L, D) hidden states.
        noise_scheduler: a diffusers scheduler with ``add_noise`` and, for v-prediction, ``get_velocity``.
        data: the encoded training set.
        settings: optimisation settings.
        parameters: the parameters to train (all of them for full training, the LoRA ones otherwise).
        checkpoint_dir: where checkpoints go; None disables checkpoints and resume.
        ema_parameters: the parameters to average with EMA (default: ``parameters``).
    """

    def __init__(self, unet, text_encoder, noise_scheduler, data: EncodedData, settings: TrainSettings,
                 parameters: list[torch.nn.Parameter], checkpoint_dir: Path | None = None,
                 ema_parameters: list[torch.nn.Parameter] | None = None):
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        self.settings = settings
        self.data = data
        self.noise_scheduler = noise_scheduler
        self.checkpoint_dir = checkpoint_dir
        from accelerate.state import AcceleratorState

        # accelerate keeps mixed precision in a process-wide singleton; each run sets its own, so clear it
        # (the process group, in PartialState, is kept) so that a second run in one process can differ.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=settings.mixed_precision,
            gradient_accumulation_steps=settings.gradient_accumulation,
        )
        torch.manual_seed(settings.seed)
        self.parameters = parameters
        optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=settings.warmup_steps)
        self.train_text_encoder = any(p.requires_grad for p in text_encoder.parameters())
        if self.train_text_encoder:
            self.unet, self.text_encoder, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
                unet, text_encoder, optimizer, lr_scheduler
            )
        else:  # a frozen module cannot be wrapped in DistributedDataParallel
            self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(unet, optimizer, lr_scheduler)
            self.text_encoder = text_encoder.to(self.accelerator.device)
        self.ema = None
        if settings.ema_max_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(ema_parameters or parameters, decay=settings.ema_max_decay,
                                use_ema_warmup=True, power=2 / 3,
                                foreach=True)  # one fused update, not a Python loop over the tensors
        self.generator = torch.Generator().manual_seed(settings.seed)  # the data index stream, same on every rank
        self.rank = self.accelerator.process_index
        self.noise_generator = torch.Generator().manual_seed(rank_seed(settings.seed, self.rank))
        self.python_rng = random.Random(settings.seed)
        self.step = 0
        self.loss_average = LossAverage()

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to resume: trained weights, optimizer, LR scheduler, EMA and RNG states, and the
        displayed loss's average (:class:`LossAverage`)."""
        state = {
            "parameters": [p.detach() for p in self.parameters],
            "optimizer": self.optimizer.optimizer.state_dict() if hasattr(self.optimizer, "optimizer")
            else self.optimizer.state_dict(),
            "lr_scheduler": {k: v for k, v in self.lr_scheduler.scheduler.state_dict().items() if k != "lr_lambdas"},
            "generator": self.generator.get_state(),
            "noise_generators": self._gather_noise_states(),  # (world, S): row r is rank r's stream
            "torch_rng": torch.get_rng_state(),
            "python_rng": list(self.python_rng.getstate()[1]) + [self.python_rng.getstate()[2]],
            "settings": asdict(self.settings),
            "loss_average": self.loss_average.state(),
        }
        if self.ema is not None:
            ema_state = self.ema.state_dict()
            ema_state["shadow_params"] = list(ema_state["shadow_params"])
            state["ema"] = ema_state
        return state

    def _gather_noise_states(self) -> torch.Tensor:
        """Every rank's noise generator state, (world, S) uint8 (a collective: all ranks must call it)."""
        own = self.noise_generator.get_state().unsqueeze(0)  # (1, S)
        if self.accelerator.num_processes == 1:
            return own
        return self.accelerator.gather(own.to(self.accelerator.device)).cpu()

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (the main process writes; every rank must call it, since the
        ranks' noise generator states are gathered); returns its folder on the main process."""
        if self.checkpoint_dir is None:
            return None
        state = self.state()
        if not self.is_main_process:
            return None
        return save_checkpoint(self.checkpoint_dir, self.step, state)

    def resume(self) -> int:
        """Restore the latest checkpoint in ``checkpoint_dir``; returns its step (0 when there is none).

        Raises:
            CheckpointError: the checkpoint does not fit the model being trained.
        """
        found = list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir else []
        if not found:
            return 0
        step, state = load_checkpoint(found[-1])
        saved = state["parameters"]
        if len(saved) != len(self.parameters) or any(a.shape != b.shape for a, b in zip(saved, self.parameters)):
            raise CheckpointError(f"checkpoint {found[-1]} was made for a different model or LoRA rank")
        with torch.no_grad():
            for param, value in zip(self.parameters, saved):
                param.copy_(value)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        inner.load_state_dict(state["optimizer"])
        scheduler_state = dict(state["lr_scheduler"], lr_lambdas=[None] * len(inner.param_groups))
        self.lr_scheduler.scheduler.load_state_dict(scheduler_state)
        self.generator.set_state(state["generator"])
        noise_states = state.get("noise_generators")
        if noise_states is not None and noise_states.shape[0] == self.accelerator.num_processes:
            self.noise_generator.set_state(noise_states[self.rank].clone())
        else:  # an older checkpoint, or another world size: a fresh stream per rank, fixed by the step
            self.noise_generator.manual_seed(rank_seed(self.settings.seed + step, self.rank))
        torch.set_rng_state(state["torch_rng"])
        python_state = state["python_rng"]
        self.python_rng.setstate((3, tuple(python_state[:-1]), python_state[-1]))
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.loss_average.load(state.get("loss_average"))
        self.step = step
        return step

    # -- the loop ----------------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's slice of the next global batch: latents (B, C, h, w) and either ids (B, L) or,
        with cached ``hidden_states``, hidden states (B, L, D)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        size = self.settings.batch_size
        index = torch.randint(0, len(self.data), (size * world,), generator=self.generator)[rank * size:(rank + 1) * size]
        cached = self.data.hidden_states is not None
        latents = self.data.latents[index]
        ids = (self.data.hidden_states if cached else self.data.input_ids)[index].clone()
        if self.settings.caption_dropout > 0:
            drop = torch.rand(size, generator=self.noise_generator) < self.settings.caption_dropout
            ids[drop] = self.data.empty_hidden if cached else self.data.empty_ids
        return latents.to(self.accelerator.device), ids.to(self.accelerator.device)

    def _draw_noise(self, shape: torch.Size) -> torch.Tensor:
        """Gaussian noise of ``shape`` (B, C, h, w) from this rank's own generator."""
        return torch.randn(shape, generator=self.noise_generator)

    def _stop_if_diverged(self, loss: torch.Tensor) -> None:
        """Raise on every rank when the loss is NaN/Inf on any rank, before ``backward``: a rank that stopped
        alone would leave the others waiting for it in the gradient all-reduce.

        Raises:
            TrainingDivergedError: naming the step and, with several processes, how many ranks diverged.
        """
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.accelerator.device)
        world = self.accelerator.num_processes
        if world > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            return
        where = "another process's loss became NaN/Inf" if torch.isfinite(loss) else f"loss became {loss.item()}"
        if world > 1:
            where += f" (on {int(bad.item())} of {world} processes)"
        advice = (f"Lower --learning-rate (now {self.settings.learning_rate:g})" +
                  (" or use --mixed-precision no" if self.settings.mixed_precision != "no" else ""))
        raise TrainingDivergedError(f"{where} at step {self.step + 1}; nothing was saved after step {self.step}. "
                                    f"{advice}")

    def _loss(self, latents: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        scheduler = self.noise_scheduler
        noise = self._draw_noise(latents.shape).to(latents.device)
        timesteps = sample_timesteps(scheduler.config.num_train_timesteps, latents.shape[0],
                                     self.settings.high_noise_fraction, self.noise_generator).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps) \
            if scheduler.config.prediction_type == "v_prediction" else noise
        with self.accelerator.autocast():
            if self.data.hidden_states is not None:
                hidden = ids  # cached (B, L, D)
            else:
                with torch.set_grad_enabled(self.train_text_encoder):
                    hidden = self.text_encoder(ids)[0]  # (B, L, D)
            prediction = self.unet(noisy, timesteps, hidden).sample  # (B, C, h, w)
        error = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if self.settings.snr_gamma is not None:
            error = error * snr_weights(scheduler, timesteps, self.settings.snr_gamma, self.settings.snr_floor)
        return error.mean()

    def run(self, on_step: Callable[[StepReport], None] | None = None,
            on_save: Callable[[int], None] | None = None) -> TrainResult:
        """Train until ``settings.steps``, checkpointing every ``settings.save_every`` steps.

        Args:
            on_step: called after every optimiser step (main process only).
            on_save: called with the step after every checkpoint, e.g. to write sample images.

        Returns:
            A :class:`TrainResult`.

        Raises:
            TrainingDivergedError: the loss became NaN or Inf; the step is named and nothing is saved.
        """
        import time

        start_step, started = self.step, time.perf_counter()
        self.unet.train()
        self.text_encoder.train(self.train_text_encoder)
        # Adam's second moments and small gradients can drift into denormal floats, which x86 CPUs compute many
        # times slower; flushing them to zero costs no accuracy that matters here. The setting is process-wide,
        # so it is undone at the end: images generated later in this process come out as in any other.
        flush = self.accelerator.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            self._train_steps(on_step, on_save)
        finally:
            if flush:
                torch.set_flush_denormal(False)  # torch's default (it has no getter to restore another)
        self.accelerator.wait_for_everyone()
        return TrainResult(start_step, self.step, self.loss_average.value, time.perf_counter() - started,
                           asdict(self.settings))

    def _train_steps(self, on_step, on_save) -> None:
        while self.step < self.settings.steps:
            step_loss = 0.0
            for _ in range(self.settings.gradient_accumulation):
                with self.accelerator.accumulate(self.unet):
                    latents, ids = self._batch()
                    loss = self._loss(latents, ids)
                    self._stop_if_diverged(loss)
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.parameters, self.settings.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                step_loss += loss.item() / self.settings.gradient_accumulation
            self.step += 1
            if self.ema is not None:
                self.ema.step(self.parameters)
            smoothed = self.loss_average.update(step_loss)
            if on_step and self.is_main_process:
                on_step(StepReport(self.step, self.settings.steps, smoothed))
            every = self.settings.save_every
            if (every and self.step % every == 0) or self.step == self.settings.steps:
                self.save()
                if on_save and self.is_main_process:
                    on_save(self.step)

    def averaged_weights(self):
        """Context manager: inside it the trained parameters hold their EMA values (no-op without EMA)."""
        from contextlib import contextmanager

        @contextmanager
        def swap():
            if self.ema is None:
                yield
                return
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)
            try:
                yield
            finally:
                self.ema.restore(self.parameters)

        return swap()
