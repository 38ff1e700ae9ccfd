"""A tiny data-parallel training run for tests/test_training_ranks.py, started with ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_probe.py OUT_DIR [--nan-rank R] [--steps N]

Each rank writes ``OUT_DIR/rank<R>.json``: the first values of the noise it drew at every step, and how it
ended ("finished" or the divergence message). A rank given by ``--nan-rank`` returns a NaN loss at step 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--nan-rank", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from dallecli.errors import TrainingDivergedError
    from dallecli.training.trainer import DenoiserTrainer, EncodedData, TrainSettings

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)
    frozen_encoder = torch.nn.Linear(1, 1).requires_grad_(False)
    data = EncodedData(latents=torch.randn(8, 4, 8, 8), input_ids=torch.zeros(8, 4, dtype=torch.long),
                       empty_ids=torch.zeros(4, dtype=torch.long), hidden_states=torch.randn(8, 4, 8),
                       empty_hidden=torch.zeros(4, 8))
    drawn: list[list[float]] = []

    class Probe(DenoiserTrainer):
        def _draw_noise(self, shape):
            noise = super()._draw_noise(shape)
            drawn.append(noise.flatten()[:4].tolist())
            return noise

        def _loss(self, latents, ids):
            loss = super()._loss(latents, ids)
            if self.rank == args.nan_rank and self.step == 1:
                return loss * float("nan")
            return loss

    settings = TrainSettings(steps=args.steps, batch_size=2, seed=5, caption_dropout=0.5)
    trainer = Probe(unet, frozen_encoder, DDPMScheduler(), data, settings, list(unet.parameters()))
    try:
        trainer.run()
        ended = "finished"
    except TrainingDivergedError as exc:
        ended = str(exc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.rank}.json").write_text(json.dumps({"noise": drawn, "ended": ended}))
    return 0 if ended == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
