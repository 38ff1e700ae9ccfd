"""Train a small ``AutoencoderTiny`` (TAESD-class) that maps RGB images to latents and back.

Used by :mod:`dallecli.training.build_default` for the embedded model: the latent diffusion model then
works on (B, 4, H/4, W/4) latents instead of pixels, which makes each denoising step ~12x cheaper. The
decoder is trained on latents with a little Gaussian noise added so that it tolerates the small errors a
sampler leaves (the idea of noise-augmented decoding as in TAESD and Stable Cascade's decoders).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and training settings.

    Attributes:
        block_out_channels: channels per resolution level (equal, as EncoderTiny needs); ``len - 1``
            halvings of the image size.
        latent_channels: channels of the latent tensor.
        steps: optimisation steps; batch_size: images per step; learning_rate: AdamW learning rate.
        latent_noise: standard deviation of the noise added to latents before decoding, in latent units.
    """

    block_out_channels: tuple[int, ...] = (32, 32, 32)
    latent_channels: int = 4
    steps: int = 1200
    batch_size: int = 16
    learning_rate: float = 2e-3
    latent_noise: float = 0.05


def build_autoencoder(config: AutoencoderConfig):
    """A freshly initialised ``diffusers.AutoencoderTiny`` with ``config``'s shape."""
    from diffusers import AutoencoderTiny

    levels = len(config.block_out_channels)
    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=config.block_out_channels,
        decoder_block_out_channels=tuple(reversed(config.block_out_channels)),
        num_encoder_blocks=(1,) * levels,
        num_decoder_blocks=(1,) * levels,
        latent_channels=config.latent_channels,
        upsampling_scaling_factor=2,
    )


def train_autoencoder(
    images: torch.Tensor,
    config: AutoencoderConfig,
    *,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    device: str = "cpu",
):
    """Train an autoencoder on ``images`` and set its latent ``scaling_factor`` to 1 / latent std.

    Args:
        images: (N, 3, H, W) uint8 RGB images.
        config: architecture and optimisation settings.
        seed: seeds initialisation, batch order and noise.
        on_step: called as ``on_step(step, loss)`` after each step (1-based step).
        device: where it trains ("cpu", "cuda"); batches and noise are drawn on the CPU from ``seed``, so the data
            stream is the same on any device.

    Returns:
        The trained ``AutoencoderTiny`` in eval mode, on the CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_autoencoder(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps)
    model.train()
    for step in range(1, config.steps + 1):
        index = torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)
        batch = images[index].to(device).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        latents = model.encoder(batch)
        noisy = latents + config.latent_noise * torch.randn(latents.shape, generator=generator).to(device)
        decoded = model.decoder(noisy)
        loss = F.mse_loss(decoded, batch) + 0.1 * F.l1_loss(decoded, batch) + 1e-4 * latents.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step:
            on_step(step, loss.item())
    model.eval()
    with torch.no_grad():
        sample = images[:2048].float() / 127.5 - 1.0
        std = torch.cat([model.encoder(chunk.to(device)) for chunk in sample.split(256)]).std().item()
    model.to("cpu")
    model.register_to_config(scaling_factor=1.0 / std)
    return model
