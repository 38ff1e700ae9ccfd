"""Rebuild the embedded default model ("shapes") from nothing, deterministically for a given seed.

    python -m dallecli.training.build_default --out src/dallecli/models/shapes

Stages (each cached in ``--work``, so an interrupted build resumes where it stopped):

1. render ``--images`` captioned scenes of the shapes world (:mod:`dallecli.training.shapes`);
2. learn a CLIP-format BPE vocabulary from the captions;
3. train a 4x ``AutoencoderTiny`` on the images and encode every image once;
4. "base": train a CLIP text encoder and a ``UNet2DConditionModel`` from scratch, jointly, with the
   project's trainer in full mode (v-prediction, zero-terminal-SNR cosine schedule, Min-SNR weighting, EMA);
   its EMA weights are kept in ``--work``/base;
5. "layout": train on from those weights with half of each batch drawn from the noisiest fifth of the
   timesteps and the Min-SNR weight floored at 1 (truncated SNR), which teaches the position words;
6. save a ``StableDiffusionPipeline`` folder (safetensors only) plus ``training.json`` recording how;
7. train the embedded CLIP scorer (``shapes-clip``, for ``dalle score`` and ``--rerank``) on the same world with
   the new model's tokenizer (:mod:`dallecli.training.build_scorer`), into ``--scorer-out`` (default: beside
   ``--out``, named ``shapes-clip``).

The result loads with plain ``diffusers.DiffusionPipeline.from_pretrained(path, use_safetensors=True)``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dallecli.atomic import staged_folder
from dallecli.engine.known_words import words_of
from dallecli.training import shapes
from dallecli.training.autoencoder import AutoencoderConfig, train_autoencoder
from dallecli.training.clip_layout import write_hub_layout
from dallecli.training.trainer import DenoiserTrainer, EncodedData, StepReport, TrainSettings
from dallecli.training.vocabulary import build_clip_vocabulary
from dallecli.training.worklog import work_log

SUBJECT = "flat coloured shapes (circle, square, triangle) on plain backgrounds"
MAX_TOKENS = 32  # the captions of this world need at most ~16 tokens
SAMPLE_PROMPTS = [
    "a red circle on a blue background",
    "a small yellow square in the top left corner, black background",
    "green triangle, white background",
    "a large circle that is orange, on gray",
    "a purple triangle on a white background",  # held out
    "an orange square on a black background",  # held out
    "a green circle on a yellow background",  # held out
    "a yellow circle on a blue background",  # held out
]


def noise_scheduler_config() -> dict:
    """The diffusion process: cosine betas rescaled to zero terminal SNR (Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed"), v-prediction, trailing timesteps, so that
    few-step samplers start from pure noise and end on a clean image."""
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "clip_sample": False,
    }


def build_text_encoder(vocab_size: int, bos: int, eos: int, *, hidden_size: int = 128, layers: int = 2,
                       max_tokens: int = MAX_TOKENS):
    """A CLIP text encoder (by default 2 layers, hidden size 128, for the closed shapes vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=max_tokens, projection_dim=hidden_size,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )
    return CLIPTextModel(config)


def build_unet(latent_channels: int, latent_size: int, *, channels: tuple[int, int, int] = (32, 64, 128),
               cross_attention_dim: int = 128):
    """A UNet with cross-attention at 1/2 and 1/4 of the latent size; by default 4.2M parameters, channels
    32/64/128 (the shapes model). ``cross_attention_dim`` is the text encoder's hidden size."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(channels), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers reads this as the number of heads
    )


def render_dataset(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, 64, 64) uint8 images and their captions, training combinations only."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(count):
        scene = shapes.sample_scene(rng)
        images.append(np.asarray(shapes.render(scene)))
        captions.append(shapes.caption(scene, rng))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def code_version() -> str:
    """The commit of this code (with "-dirty" when the working tree has uncommitted changes), or "unknown"."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_pipeline(unet, text_encoder, tokenizer, vae, scheduler_config: dict):
    """Assemble a ``StableDiffusionPipeline`` (no safety checker) with DPM-Solver++ as its scheduler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++",
                                                        final_sigmas_type="zero")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--work", type=Path, default=Path("build/shapes-work"), help="cache and checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=40_000)
    parser.add_argument("--steps", type=int, default=7_000, help="stage 4: training from scratch")
    parser.add_argument("--layout-steps", type=int, default=3_000, help="stage 5: weight on the noisiest timesteps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=6e-4)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--scorer-out", type=Path, default=None,
                        help="the embedded scorer's folder (default: shapes-clip beside --out)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work: Path = args.work
    say = work_log(work)

    started = time.time()
    from diffusers import AutoencoderTiny, DDPMScheduler
    from transformers import CLIPTokenizer

    # 1-2. data and vocabulary
    images, captions = render_dataset(args.images, args.seed)
    build_clip_vocabulary(captions, work / "tokenizer")
    tokenizer = CLIPTokenizer(vocab=str(work / "tokenizer" / "vocab.json"),
                              merges=str(work / "tokenizer" / "merges.txt"), model_max_length=MAX_TOKENS)
    say(f"rendered {len(captions)} images, vocabulary of {len(tokenizer)} tokens")

    # 3. autoencoder, then latents
    ae_config = AutoencoderConfig()
    if (work / "vae" / "config.json").exists():
        vae = AutoencoderTiny.from_pretrained(work / "vae", use_safetensors=True)
    else:
        vae = train_autoencoder(images, ae_config, seed=args.seed,
                                on_step=lambda s, l: s % 100 == 0 and say(f"autoencoder step {s} loss {l:.5f}"))
        vae.save_pretrained(work / "vae", safe_serialization=True)
    vae.eval()
    latents_path = work / "latents.safetensors"
    if latents_path.exists():
        from safetensors.torch import load_file

        latents = load_file(latents_path)["latents"]
    else:
        from safetensors.torch import save_file

        with torch.no_grad():
            chunks = [vae.encode(b.float() / 127.5 - 1).latents for b in images.split(256)]
        latents = torch.cat(chunks) * vae.config.scaling_factor  # (N, 4, 16, 16)
        save_file({"latents": latents.contiguous()}, latents_path)
        with torch.no_grad():
            decoded = vae.decode(latents[:256] / vae.config.scaling_factor).sample
        mse = ((decoded.clamp(-1, 1) + 1) / 2 - images[:256].float() / 255).pow(2).mean().item()
        say(f"autoencoder PSNR on 256 training images: {10 * np.log10(1 / mse):.1f} dB")
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
    data = EncodedData(latents=latents, input_ids=ids, empty_ids=empty)

    # 4. text encoder + UNet, full training from scratch
    scheduler_config = noise_scheduler_config()
    noise_scheduler = DDPMScheduler(**scheduler_config)
    base = work / "base"  # the EMA weights at the end of stage 4, as a pipeline folder
    stages = []
    if not (base / "stage.json").exists():
        torch.manual_seed(args.seed)
        text_encoder = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        unet = build_unet(latents.shape[1], latents.shape[-1])
        settings = TrainSettings(
            steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=200,
            seed=args.seed, caption_dropout=0.1, ema_max_decay=0.9995, snr_gamma=5.0,
            save_every=args.save_every, weight_decay=0.0,
        )
        result = train_stage("base", unet, text_encoder, tokenizer, vae, noise_scheduler, data, settings,
                             work / "checkpoints", work, say)
        save_pipeline(result.trainer, unet, text_encoder, tokenizer, vae, scheduler_config, base)
        (base / "stage.json").write_text(json.dumps(result.record, indent=2) + "\n", encoding="utf-8")
    stages.append(json.loads((base / "stage.json").read_text(encoding="utf-8")))

    # 5. layout: the same model, trained on with weight on the noisiest timesteps, where the prompt alone
    # decides where the object goes (stage 4's Min-SNR weighting gives them almost none, and the model
    # learnt colours and shapes but not positions)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet", use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", use_safetensors=True)
    settings = TrainSettings(
        steps=args.layout_steps, batch_size=args.batch_size, learning_rate=args.learning_rate / 2,
        warmup_steps=100, seed=args.seed + 1, caption_dropout=0.1, ema_max_decay=0.999, snr_gamma=5.0,
        snr_floor=1.0, high_noise_fraction=0.5, save_every=args.save_every, weight_decay=0.0,
    )
    result = train_stage("layout", unet, text_encoder, tokenizer, vae, noise_scheduler, data, settings,
                         work / "checkpoints-layout", work, say)
    stages.append(result.record)

    # 6. save the averaged weights as the pipeline, with how it was made
    with staged_folder(args.out) as staging:  # replaces args.out in one rename when everything is written
        save_pipeline(result.trainer, unet, text_encoder, tokenizer, vae, scheduler_config, staging)
        record = {
            "command": "python -m dallecli.training.build_default " + " ".join(sys.argv[1:] if argv is None else argv),
            "data_seed": args.seed, "images": args.images, "steps": sum(stage["steps"] for stage in stages),
            "batch_size": args.batch_size, "autoencoder": vars(ae_config), "stages": stages,
            "wall_time_s": sum(stage["wall_time_s"] for stage in stages), "torch": torch.__version__,
            "held_out": sorted(" ".join(p) for p in shapes.HELD_OUT_PAIRS) + ["yellow on blue background"],
            # what the model can be asked for: `dalle generate` warns about prompt words outside these
            "subject": SUBJECT, "words": sorted({word for text in captions for word in words_of(text)}),
        }
        (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        # The full log (every stage, loss and steps/s, with times, across interruptions and resumes).
        shutil.copyfile(work / "log.txt", staging / "training-log.txt")
    say(f"wrote {args.out} ({record['steps']} steps, {time.time() - started:.0f} s)")

    # 7. the embedded scorer, reading prompts with this model's tokenizer
    from dallecli.training import build_scorer

    scorer_out = args.scorer_out or args.out.parent / "shapes-clip"
    build_scorer.main(["--out", str(scorer_out), "--tokenizer", str(args.out / "tokenizer"),
                       "--work", str(work / "scorer"), "--seed", str(args.seed)]
                      + (["--threads", str(args.threads)] if args.threads else []))


@dataclass
class StageResult:
    """A finished training stage: its trainer (for the EMA weights) and what ``training.json`` records."""

    trainer: DenoiserTrainer
    record: dict


def train_stage(name: str, unet, text_encoder, tokenizer, vae, noise_scheduler, data: EncodedData,
                settings: TrainSettings, checkpoints: Path, work: Path, say) -> StageResult:
    """Train ``unet`` and ``text_encoder`` jointly (resuming from ``checkpoints``), writing a sample grid
    ``samples-<name>-<step>.png`` to ``work`` at every checkpoint."""
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    trainer = DenoiserTrainer(unet, text_encoder, noise_scheduler, data, settings, parameters,
                              checkpoint_dir=checkpoints)
    resumed = trainer.resume()
    if resumed:
        say(f"{name}: resumed at step {resumed}")
    loop_start = time.time()

    def on_step(report: StepReport) -> None:
        if report.step % 50 == 0:
            rate = (report.step - resumed) / (time.time() - loop_start)
            say(f"{name} step {report.step}/{report.total} loss {report.loss:.4f} {rate:.2f} steps/s")

    def on_save(step: int) -> None:
        with trainer.averaged_weights():
            pipe = make_pipeline(unet, text_encoder, tokenizer, vae, noise_scheduler.config)
            sample_grid(pipe, SAMPLE_PROMPTS, seeds=range(4)).save(work / f"samples-{name}-{step:07d}.png")
        unet.train()
        text_encoder.train()

    result = trainer.run(on_step=on_step, on_save=on_save)
    record = {"stage": name, "steps": result.steps, "trainer": result.settings, "final_loss": round(result.loss, 4),
              "wall_time_s": round(time.time() - loop_start), "resumed_from": resumed, "code_version": code_version()}
    return StageResult(trainer, record)


def save_pipeline(trainer: DenoiserTrainer, unet, text_encoder, tokenizer, vae, scheduler_config, folder: Path) -> None:
    """Write the trainer's EMA weights as a safetensors pipeline folder (replacing ``folder``), the text encoder in
    the Hub's key layout (:mod:`dallecli.training.clip_layout`)."""
    with trainer.averaged_weights():
        pipe = make_pipeline(unet.eval(), text_encoder.eval(), tokenizer, vae, dict(scheduler_config))
        shutil.rmtree(folder, ignore_errors=True)
        pipe.save_pretrained(folder, safe_serialization=True)
    write_hub_layout(Path(folder) / "text_encoder")  # loadable by every transformers in our range


def sample_grid(pipe, prompts: list[str], seeds, steps: int = 20, guidance: float = 4.0):
    """One row per prompt, one column per seed: a PIL image of 64-pixel tiles."""
    from PIL import Image

    seeds = list(seeds)
    pipe.set_progress_bar_config(disable=True)
    tiles = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, height=64, width=64).images
        tiles.append(out)
    grid = Image.new("RGB", (64 * len(seeds), 64 * len(prompts)))
    for row, images in enumerate(tiles):
        for col, image in enumerate(images):
            grid.paste(image, (64 * col, 64 * row))
    return grid


if __name__ == "__main__":
    main()
