"""Timestep sampling and loss weighting of the trainer (the layout stage of the embedded model relies on them)."""

import pytest
import torch
from diffusers import DDPMScheduler

from dallecli.training.build_default import noise_scheduler_config
from dallecli.training.trainer import sample_timesteps, snr_weights


def test_uniform_timesteps_are_unchanged_without_high_noise_fraction():
    # fraction 0 draws exactly what torch.randint draws, so runs made before the option reproduce
    ours = sample_timesteps(1000, 64, 0.0, torch.Generator().manual_seed(3))
    plain = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, plain)


def test_high_noise_fraction_moves_that_share_into_the_noisiest_fifth():
    drawn = sample_timesteps(1000, 20_000, 0.5, torch.Generator().manual_seed(0))
    assert drawn.min() >= 0 and drawn.max() <= 999
    share = (drawn >= 800).float().mean().item()
    assert share == pytest.approx(0.5 + 0.5 * 0.2, abs=0.015)  # the chosen half plus the uniform half's fifth


def test_min_snr_floor_keeps_weight_at_zero_terminal_snr():
    scheduler = DDPMScheduler(**noise_scheduler_config())  # v-prediction, zero terminal SNR
    t = torch.tensor([999, 500, 50])
    plain = snr_weights(scheduler, t, 5.0)
    floored = snr_weights(scheduler, t, 5.0, floor=1.0)
    assert plain[0].item() == pytest.approx(0.0, abs=1e-6)  # Min-SNR ignores the noisiest step entirely
    assert floored[0].item() == pytest.approx(1.0, abs=1e-6)  # x0 weight 1 / (SNR + 1) with SNR = 0
    snr = scheduler.alphas_cumprod[50] / (1 - scheduler.alphas_cumprod[50])
    assert snr > 5  # at low noise the floor changes nothing: gamma / (SNR + 1)
    assert floored[2].item() == pytest.approx(plain[2].item()) == pytest.approx((5.0 / (snr + 1)).item(), rel=1e-5)


def test_floor_is_refused_for_epsilon_prediction():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    with pytest.raises(ValueError, match="v-prediction"):
        snr_weights(scheduler, torch.tensor([10]), 5.0, floor=1.0)
