"""Build the emoji model (#15): an SD-architecture pipeline trained from scratch on the emoji world.

    python -m dallecli.training.emoji_source                      # fetch the sources once (npm)
    python -m dallecli.training.build_emoji --out build/emoji-model --threads 1
    python -m dallecli.training.build_emoji --out build/emoji-model --threads 1 \\
        --resume-from-compact build/emoji-compact                 # on a new machine: go on from a committed one

Stages (each cached in ``--work``, so an interrupted build resumes where it stopped):

1. render ``--images`` captioned scenes of the emoji world (:mod:`dallecli.training.emoji_world`) over the
   ``--concepts`` selection, cached once as ``images.npy`` (uint8, (N, 64, 64, 3)) + ``captions.json``;
2. learn a CLIP-format BPE vocabulary from the captions (the longest caption must fit ``MAX_TOKENS``);
3. train a 4x ``AutoencoderTiny`` (4 latent channels: 16x16x4 latents) on the images, report its PSNR, and
   encode every image once (``latents.safetensors``);
4. train a CLIP text encoder and a ``UNet2DConditionModel`` from scratch, jointly, with the project's trainer
   (v-prediction, zero-terminal-SNR cosine schedule, Min-SNR weighting, EMA). Unlike the shapes build, the
   "layout" weighting (a share of each batch from the noisiest fifth of the timesteps, Min-SNR weight floored
   at 1: see :mod:`dallecli.training.build_default`) is on from the start, so that one stage with one
   learning curve covers concept, background, size and position;
5. every ``--eval-every`` steps, generate the fixed held-out evaluation scenes with the EMA weights, score
   them with the emoji judge (concept top-1/top-5) and the scene detector (background, size, position), and
   append a row to ``--work``/``curve.jsonl``; at every checkpoint also write a compact checkpoint
   (``--compact``: float16 EMA and current weights, the VAE, the tokenizer and the settings; small enough to
   commit) from which ``--resume-from-compact`` goes on on another machine (the optimizer's moments restart,
   with a fresh learning-rate warm-up);
6. save a ``StableDiffusionPipeline`` folder (safetensors only) plus ``training.json`` recording how.

``--time-limit`` (minutes) or SIGTERM/SIGINT end the training cleanly: a full checkpoint, a compact one and
an evaluation are written at the step reached, and a later run with the same arguments resumes from it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dallecli.atomic import default_mode, place, staged_file, staged_folder, write_file
from dallecli.engine.known_words import words_of
from dallecli.training import emoji_world as world
from dallecli.training.autoencoder import AutoencoderConfig, train_autoencoder
from dallecli.training.build_default import (
    build_text_encoder, build_unet, code_version, make_pipeline, noise_scheduler_config, sample_grid,
    save_pipeline,
)
from dallecli.training.emoji_source import DEFAULT_CACHE, SELECTIONS, load_concepts, sources_record
from dallecli.training.trainer import DenoiserTrainer, EncodedData, StepReport, TrainSettings, rank_seed
from dallecli.training.vocabulary import build_clip_vocabulary
from dallecli.training.worklog import work_log

SUBJECT = "emoji (Noto) of everyday things on plain or gradient backgrounds, at a size and a position"
MAX_TOKENS = 32  # the longest caption of the emoji world is ~24 tokens (checked at build time)
COMPACT_WEIGHTS = "compact.safetensors"  # the current weights, float16
COMPACT_EMA = "compact-ema.safetensors"  # their EMA, float16: two files, each under a 16 MiB transfer limit
COMPACT_RECORD = "compact.json"
SAMPLE_PROMPTS = [  # the "done when" prompts, for the contact sheet at the end
    "a red circle on a blue background",
    "a cat face",
    "a rocket",
    "a red apple on a blue background",
    "a small dog face in the bottom right corner",
    "a cat astronaut",
    "a large pizza on a yellow background",
    "a small blue square in the top left corner, black background",
]


@dataclass(frozen=True)
class ModelSize:
    """The generator's shape: UNet channels per level, text encoder hidden size (= cross-attention size) and
    layers, autoencoder channels per level (3 levels: 4x down)."""

    unet_channels: tuple[int, int, int] = (48, 96, 112)
    text_hidden: int = 128
    text_layers: int = 2
    ae_channels: tuple[int, int, int] = (32, 32, 32)
    latent_channels: int = 4


@dataclass(frozen=True)
class EvalSettings:
    """The learning-curve evaluation: ``concepts`` concepts spread evenly over the selection, each with
    ``per_concept`` held-out scenes (:func:`emoji_world.evaluation_scenes`), generated with ``steps`` DPM-Solver
    steps at ``guidance``."""

    concepts: int = 100
    per_concept: int = 2
    seed: int = 1234
    steps: int = 20
    guidance: float = 4.0


# ---------------------------------------------------------------------------------------------- data stages

def load_or_render(work: Path, count: int, concepts, seed: int) -> tuple[np.ndarray, list[str]]:
    """Stage 1: ``count`` training scenes, rendered once and cached in ``work`` (``images.npy``, no pickle).

    Returns:
        ``(images, captions)``: (N, 64, 64, 3) uint8 and N captions.
    """
    images_path, captions_path = work / "images.npy", work / "captions.json"
    if images_path.exists() and captions_path.exists():
        record = json.loads(captions_path.read_text(encoding="utf-8"))
        if record["count"] == count and record["seed"] == seed and record["concepts"] == [c.id for c in concepts]:
            return np.load(images_path, allow_pickle=False), record["captions"]
    images, captions = world.render_dataset(count, concepts, seed)
    write_file(images_path, lambda handle: np.save(handle, images, allow_pickle=False))
    write_file(captions_path, json.dumps({"count": count, "seed": seed, "concepts": [c.id for c in concepts],
                                          "captions": captions}) + "\n")
    return images, captions


def load_tokenizer(folder: Path, max_tokens: int = MAX_TOKENS):
    """A ``CLIPTokenizer`` from a ``vocab.json`` + ``merges.txt`` folder."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         model_max_length=max_tokens)


def longest_caption_tokens(tokenizer, captions: list[str]) -> int:
    """The token count (with start and end tokens) of the longest caption."""
    return max(len(ids) for ids in tokenizer(captions).input_ids)


def train_or_load_vae(work: Path, images: np.ndarray, config: AutoencoderConfig, seed: int, say,
                      device: str = "cpu"):
    """Stage 3a: the autoencoder from ``work``/vae (on the CPU), trained there first (on ``device``) if missing."""
    from diffusers import AutoencoderTiny

    if (work / "vae" / "config.json").exists():
        return AutoencoderTiny.from_pretrained(work / "vae", use_safetensors=True).eval()
    started = time.time()
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, 64, 64) uint8 view
    vae = train_autoencoder(chw, config, seed=seed, device=device, on_step=lambda s, l: s % 100 == 0 and say(
        f"autoencoder step {s}/{config.steps} loss {l:.5f} ({time.time() - started:.0f} s)"))
    with staged_folder(work / "vae") as staging:
        vae.save_pretrained(staging, safe_serialization=True)
    return vae.eval()


def autoencoder_psnr(vae, images: np.ndarray, count: int = 512) -> float:
    """Reconstruction PSNR (dB) of the autoencoder on the first ``count`` images (N, 64, 64, 3) uint8."""
    batch = torch.from_numpy(images[:count]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, 64, 64)
    with torch.no_grad():
        decoded = torch.cat([vae.decode(vae.encode(b).latents).sample for b in batch.split(128)])
    mse = ((decoded.clamp(-1, 1) - batch) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


def load_or_encode(work: Path, vae, images: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """Stage 3b: every image's latents, (N, C, 16, 16) float32 on the CPU times the scaling factor, encoded once
    (on ``device``; ``vae`` is left on the CPU)."""
    from safetensors.torch import load_file, save_file

    path = work / "latents.safetensors"
    if path.exists():
        latents = load_file(path)["latents"]
        if latents.shape[0] == images.shape[0]:
            return latents
    chunks = []
    vae.to(device)
    with torch.no_grad():
        for start in range(0, len(images), 256):
            batch = torch.from_numpy(images[start:start + 256]).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1
            chunks.append(vae.encode(batch).latents.cpu())
    vae.to("cpu")
    latents = (torch.cat(chunks) * vae.config.scaling_factor).contiguous()  # (N, 4, 16, 16)
    with staged_file(work, ".safetensors", what=str(path)) as staging:  # safetensors writes to a path
        save_file({"latents": latents}, staging)
        default_mode(staging)  # safetensors' writer makes it 0600
        place(staging, path)
    return latents


def evenly_spaced(concepts: list, count: int) -> list:
    """``count`` concepts taken at an even stride through ``concepts`` (which are in emoji order, so every
    category keeps its share), the coloured shapes always kept so that the shapes world's prompts stay drawable.

    Raises:
        ValueError: ``count`` is below the number of coloured shapes or above ``len(concepts)``.
    """
    from dallecli.training.emoji_source import SHAPE_EMOJI

    shapes = [c for c in concepts if c.id in SHAPE_EMOJI]
    others = [c for c in concepts if c.id not in SHAPE_EMOJI]
    if not len(shapes) <= count <= len(concepts):
        raise ValueError(f"a subset must hold {len(shapes)}..{len(concepts)} concepts, not {count}")
    wanted = count - len(shapes)
    chosen = {others[int(i * len(others) / wanted)].id for i in range(wanted)} if wanted else set()
    return [c for c in concepts if c.id in chosen or c.id in SHAPE_EMOJI]


# ---------------------------------------------------------------------------------------------- evaluation

def evaluation_set(concepts, settings: EvalSettings) -> list[tuple[world.EmojiScene, str]]:
    """The fixed learning-curve scenes: ``settings.concepts`` concepts taken evenly from ``concepts``."""
    stride = max(1, len(concepts) // settings.concepts)
    chosen = concepts[::stride][:settings.concepts]
    return world.evaluation_scenes(chosen, settings.per_concept, settings.seed)


def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0, batch: int = 100) -> np.ndarray:
    """Images (N, 64, 64, 3) uint8 for ``prompts``, the i-th drawn with seed ``seed + i``."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(prompts), batch):
        part = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(part))]
        images = pipe(part, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      height=64, width=64, output_type="np").images  # (B, 64, 64, 3) float in [0, 1]
        out.append((images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def score(images: np.ndarray, scenes: list[world.EmojiScene], judge) -> dict:
    """Concept top-1/top-5 (by ``judge``) and background/size/position accuracy of generated images."""
    from dallecli.training import emoji_judge

    concept = judge.concept_accuracy(images, [s.concept for s in scenes])
    scene_scores = emoji_judge.score_scenes(scenes, [emoji_judge.detect_scene(image) for image in images])
    held = [i for i, s in enumerate(scenes) if world.is_held_out(s)]
    held_concept = judge.concept_accuracy(images[held], [scenes[i].concept for i in held]) if held else None
    return {"top1": concept["top1"], "top5": concept["top5"], "n": concept["n"],
            **{k: v["accuracy"] for k, v in scene_scores.items()},
            "held_out_combination_top1": held_concept["top1"] if held_concept else None}


def save_png(image, path: Path) -> Path:
    """Write a PIL image as PNG, atomically."""
    return write_file(path, lambda handle: image.save(handle, format="PNG"))


def autoencoder_ceiling(vae, scenes: list[world.EmojiScene], judge) -> dict:
    """:func:`score` of the clean renders of ``scenes`` after an encode-decode round trip through ``vae``: what a
    perfect generator could reach through this autoencoder."""
    clean = np.stack([world.render_array(scene) for scene in scenes])  # (N, 64, 64, 3) uint8
    batch = torch.from_numpy(clean).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        decoded = vae.decode(vae.encode(batch).latents).sample.clamp(-1, 1)  # (N, 3, 64, 64)
    images = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return score(images, scenes, judge)


def contact_sheet(images: np.ndarray, columns: int = 4, scale: int = 2):
    """A PIL grid of (N, 64, 64, 3) uint8 images, ``columns`` wide, each tile enlarged ``scale`` times."""
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    tile = 64 * scale
    sheet = Image.new("RGB", (tile * columns, tile * rows), (255, 255, 255))
    for index, image in enumerate(images):
        picture = Image.fromarray(image).resize((tile, tile), Image.NEAREST)
        sheet.paste(picture, (tile * (index % columns), tile * (index // columns)))
    return sheet


CURVE_COLOURS = {"top1": (200, 30, 30), "top5": (240, 140, 20), "background": (40, 90, 200),
                 "size": (40, 160, 60), "position": (140, 60, 180)}


def plot_curve(rows: list[dict], width: int = 480, height: int = 240):
    """The learning curve as a PIL image: each of :data:`CURVE_COLOURS`' scores (0..1, gridlines every 0.2)
    against the step, with a legend."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 40, 10, width - 90, height - 25
    for tenth in range(0, 11, 2):
        y = bottom - (bottom - top) * tenth / 10
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((5, y - 6), f"{tenth / 10:.1f}", fill=(0, 0, 0))
    last = max((row["step"] for row in rows), default=1) or 1
    draw.text((left, bottom + 6), "0", fill=(0, 0, 0))
    draw.text((right - 40, bottom + 6), f"{last} steps", fill=(0, 0, 0))
    for index, (key, colour) in enumerate(CURVE_COLOURS.items()):
        points = [(left + (right - left) * row["step"] / last, bottom - (bottom - top) * row[key])
                  for row in rows if row.get(key) is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((right + 10, top + 14 * index), key, fill=colour)
    return image


# ---------------------------------------------------------------------------------------------- compact checkpoints

def save_compact(folder: Path, trainer: DenoiserTrainer, record: dict, work: Path) -> Path:
    """Write a committable checkpoint: float16 current weights (``compact.safetensors``, in the trainer's
    parameter order) and their EMA (``compact-ema.safetensors``), the VAE and tokenizer it trained with, and
    ``compact.json`` (step, settings)."""
    from safetensors.torch import save_file

    def half(tensors) -> dict:
        return {f"{i:04d}": t.detach().to("cpu", torch.float16).contiguous() for i, t in enumerate(tensors)}

    files = {COMPACT_WEIGHTS: half(trainer.parameters)}
    if trainer.ema is not None:
        files[COMPACT_EMA] = half(trainer.ema.shadow_params)
    with staged_folder(folder, what=f"compact checkpoint in {folder}") as staging:
        for name, tensors in files.items():
            save_file(tensors, staging / name, metadata={"step": str(trainer.step), "format": "pt"})
            default_mode(staging / name)  # safetensors' writer makes it 0600
        shutil.copytree(work / "vae", staging / "vae")
        shutil.copytree(work / "tokenizer", staging / "tokenizer")
        (staging / COMPACT_RECORD).write_text(json.dumps(dict(record, step=trainer.step), indent=2) + "\n",
                                              encoding="utf-8")
    return folder


def seed_work_from_compact(folder: Path, work: Path) -> dict:
    """Copy a compact checkpoint's VAE and tokenizer into an empty ``work`` (so that the latents are encoded
    with the very autoencoder it trained with); returns its record."""
    record = json.loads((folder / COMPACT_RECORD).read_text(encoding="utf-8"))
    for name in ("vae", "tokenizer"):
        if not (work / name).exists():
            shutil.copytree(folder / name, work / name)
    return record


def load_compact(folder: Path, trainer: DenoiserTrainer) -> int:
    """Put a compact checkpoint's weights and EMA into ``trainer`` and set its step; the optimizer's moments
    and the learning-rate warm-up start afresh, the data and noise streams are reseeded from the step.

    Returns:
        The step it continues from.

    Raises:
        ValueError: the checkpoint was made for another model shape.
    """
    from safetensors.torch import load_file

    tensors = load_file(folder / COMPACT_WEIGHTS)
    averaged = load_file(folder / COMPACT_EMA) if (folder / COMPACT_EMA).exists() else tensors
    if "param.0000" in tensors:  # the first layout: both in one file, keys "param.NNNN" and "ema.NNNN"
        averaged = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
        tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("param.")}
        averaged = averaged or tensors
    step = json.loads((folder / COMPACT_RECORD).read_text(encoding="utf-8"))["step"]
    count = len(trainer.parameters)
    if len(tensors) != count or any(tensors[f"{i:04d}"].shape != p.shape for i, p in enumerate(trainer.parameters)):
        raise ValueError(f"compact checkpoint {folder} was made for a different model size")
    with torch.no_grad():
        for i, param in enumerate(trainer.parameters):
            param.copy_(tensors[f"{i:04d}"].float())
        if trainer.ema is not None:
            for i, shadow in enumerate(trainer.ema.shadow_params):
                shadow.copy_(averaged[f"{i:04d}"].float())
            trainer.ema.optimization_step = step
    trainer.step = step
    trainer.generator.manual_seed(trainer.settings.seed + step)
    trainer.noise_generator.manual_seed(rank_seed(trainer.settings.seed + step, trainer.rank))
    return step


# ---------------------------------------------------------------------------------------------- training

class StopTraining(Exception):
    """Raised from the step callback to end the loop after a clean save (time limit or signal)."""


@dataclass
class Run:
    """What the training hooks share: where things go and what to evaluate."""

    work: Path
    compact: Path
    record: dict
    eval_scenes: list
    eval_settings: EvalSettings
    judge: object
    say: object
    eval_every: int
    deadline: float | None
    stop_requested: list = field(default_factory=lambda: [False, False])  # [asked to stop, loop running]


def train(run: Run, unet, text_encoder, tokenizer, vae, noise_scheduler, data: EncodedData,
          settings: TrainSettings, resume_compact: Path | None) -> tuple[DenoiserTrainer, int]:
    """Stage 4-5: train (resuming the full checkpoint in ``work``, else a compact one), evaluating every
    ``eval_every`` steps and writing a compact checkpoint at every save. Returns the trainer and the step."""
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    trainer = DenoiserTrainer(unet, text_encoder, noise_scheduler, data, settings, parameters,
                              checkpoint_dir=run.work / "checkpoints")
    resumed = trainer.resume()
    if resumed:
        run.say(f"resumed the full checkpoint at step {resumed}")
    elif resume_compact is not None:
        resumed = load_compact(resume_compact, trainer)
        run.say(f"resumed compact checkpoint {resume_compact} at step {resumed} (optimizer moments restart)")
    loop_start = time.time()
    evaluated = {row["step"] for row in read_curve(run.work)}
    aside = [0.0]  # seconds spent evaluating and saving, left out of the steps/s figure

    def evaluate(step: int) -> None:
        if step in evaluated:
            return
        started = time.time()
        with trainer.averaged_weights():
            pipe = make_pipeline(unet.eval(), text_encoder.eval(), tokenizer, vae, noise_scheduler.config)
            pipe.to(trainer.accelerator.device)  # the VAE joins the UNet and text encoder (a no-op on the CPU)
            prompts = [prompt for _, prompt in run.eval_scenes]
            images = generate(pipe, prompts, run.eval_settings.steps, run.eval_settings.guidance)
        unet.train()
        text_encoder.train()
        row = {"step": step, **score(images, [s for s, _ in run.eval_scenes], run.judge),
               "loss": round(trainer.loss_average.value, 4), "train_s": round(time.time() - loop_start),
               "eval_s": round(time.time() - started, 1)}
        aside[0] += time.time() - started
        with (run.work / "curve.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        evaluated.add(step)
        run.say("eval " + " ".join(f"{k}={v}" for k, v in row.items()))
        save_png(contact_sheet(images[:16]), run.work / "samples-last.png")
        save_png(plot_curve(read_curve(run.work)), run.work / "curve.png")
        write_file(run.work / "samples-last.txt", "\n".join(prompts[:16]) + "\n")

    def save_all() -> None:
        started = time.time()
        if not (trainer.checkpoint_dir / f"step-{trainer.step:07d}").exists():
            trainer.save()
        save_compact(run.compact, trainer, dict(run.record, curve=read_curve(run.work)), run.work)
        run.say(f"saved step {trainer.step} (compact checkpoint in {run.compact})")
        aside[0] += time.time() - started

    def on_step(report: StepReport) -> None:
        if report.step % 50 == 0:
            rate = (report.step - resumed) / (time.time() - loop_start - aside[0])
            run.say(f"step {report.step}/{report.total} loss {report.loss:.4f} {rate:.2f} steps/s")
        if run.eval_every and report.step % run.eval_every == 0:
            evaluate(report.step)
        out_of_time = run.deadline is not None and time.time() > run.deadline
        if (out_of_time or run.stop_requested[0]) and report.step < report.total:
            run.say(f"stopping at step {report.step} ({'time limit' if out_of_time else 'signal'})")
            evaluate(report.step)
            save_all()
            raise StopTraining

    def on_save(step: int) -> None:
        save_all()

    run.stop_requested[1] = True  # from here a signal ends the loop cleanly at the next step (on_step)
    try:
        trainer.run(on_step=on_step, on_save=on_save)
    except StopTraining:
        return trainer, trainer.step
    evaluate(trainer.step)
    save_all()
    return trainer, trainer.step


def read_curve(work: Path) -> list[dict]:
    """The learning-curve rows written so far (``curve.jsonl``), by step."""
    path = work / "curve.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted({row["step"]: row for row in rows}.values(), key=lambda row: row["step"])


def parameter_megabytes(*modules) -> float:
    """float32 size of the modules' parameters, MB."""
    return sum(p.numel() for m in modules for p in m.parameters()) * 4 / 1e6


def unet_forward_seconds(unet, text_hidden: int, threads: int = 2, repeats: int = 10) -> float:
    """Seconds of one guided UNet call at 64x64 (batch 2: prompt and empty prompt) with ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    hidden, t = torch.randn(2, MAX_TOKENS, text_hidden), torch.tensor([500, 500])
    try:
        with torch.no_grad():
            unet(x, t, hidden)
            started = time.perf_counter()
            for _ in range(repeats):
                unet(x, t, hidden)
            return (time.perf_counter() - started) / repeats
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--work", type=Path, default=Path("build/emoji-work"), help="cache, checkpoints, curve")
    parser.add_argument("--compact", type=Path, default=Path("build/emoji-compact"),
                        help="compact (committable) checkpoint folder, rewritten at every save")
    parser.add_argument("--resume-from-compact", type=Path, default=None,
                        help="go on from a compact checkpoint when --work has no full checkpoint")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="emoji sources (emoji_source)")
    parser.add_argument("--concepts", choices=sorted(SELECTIONS), default="core")
    parser.add_argument("--subset", type=int, default=0,
                        help="train on this many concepts of the selection, evenly spaced, the coloured shapes "
                             "always among them (0: all); for feasibility runs")
    parser.add_argument("--judge", type=Path, default=Path("build/emoji-judge"), help="the emoji judge folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=40_000)
    parser.add_argument("--ae-steps", type=int, default=1500)
    parser.add_argument("--ae-channels", type=int, default=32)
    parser.add_argument("--latent-channels", type=int, default=4, help="channels of the 16x16 latents")
    parser.add_argument("--ae-batch-size", type=int, default=16)
    parser.add_argument("--unet-channels", default="48,96,112")
    parser.add_argument("--text-hidden", type=int, default=128)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=6e-4)
    parser.add_argument("--high-noise-fraction", type=float, default=0.25)
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-concepts", type=int, default=100)
    parser.add_argument("--eval-per-concept", type=int, default=2)
    parser.add_argument("--eval-steps", type=int, default=20, help="sampler steps of the evaluation images")
    parser.add_argument("--time-limit", type=float, default=None, help="minutes of training, then a clean stop")
    parser.add_argument("--prepare-only", action="store_true", help="stop after the latents (stages 1-3)")
    parser.add_argument("--pipeline-on-stop", action="store_true",
                        help="write the pipeline folder also when the time limit or a signal ends the training early "
                             "(a machine lent for minutes: what it reached comes back usable)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                        help="the UNet and text encoder's training precision (accelerate); bf16 on a GPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work: Path = args.work
    say = work_log(work, sys.stderr)

    started = time.time()
    stop = [False, False]  # [asked to stop, the training loop is running and will stop itself]

    def request_stop(signum, frame) -> None:
        if not stop[1]:  # the data stages write atomically and cache what they finished: nothing to save
            raise SystemExit(128 + signum)
        stop[0] = True

    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        out = _build(args, argv, say, started, stop)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if out is not None:
        print(out)  # stdout: the written pipeline folder


def _build(args, argv, say, started: float, stop: list) -> Path | None:
    """main's stages; returns the pipeline folder, or None when it stopped early (prepare only, time, signal)."""
    work: Path = args.work
    deadline = started + 60 * args.time_limit if args.time_limit else None
    size = ModelSize(tuple(int(c) for c in args.unet_channels.split(",")), args.text_hidden, args.text_layers,
                     (args.ae_channels,) * 3, args.latent_channels)
    compact_record = None
    if args.resume_from_compact is not None:
        compact_record = seed_work_from_compact(args.resume_from_compact, work)
        say(f"compact checkpoint {args.resume_from_compact}: step {compact_record['step']}")

    # 1-2. data and vocabulary
    concepts = load_concepts(args.cache, args.concepts)
    if args.subset:
        concepts = evenly_spaced(concepts, args.subset)
    images, captions = load_or_render(work, args.images, concepts, args.seed)
    if not (work / "tokenizer" / "vocab.json").exists():
        build_clip_vocabulary(captions, work / "tokenizer")
    tokenizer = load_tokenizer(work / "tokenizer")
    longest = longest_caption_tokens(tokenizer, captions)
    if longest > MAX_TOKENS:
        raise SystemExit(f"the longest caption has {longest} tokens, more than MAX_TOKENS={MAX_TOKENS}")
    say(f"{len(concepts)} concepts ({args.concepts}), {len(captions)} images, vocabulary of {len(tokenizer)} "
        f"tokens, longest caption {longest} tokens")

    # 3. autoencoder, then latents
    ae_config = AutoencoderConfig(block_out_channels=size.ae_channels, latent_channels=size.latent_channels,
                                  steps=args.ae_steps, batch_size=args.ae_batch_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the trainer's (accelerate's) choice too
    vae = train_or_load_vae(work, images, ae_config, args.seed, say, device)
    say(f"autoencoder PSNR on 512 training images: {autoencoder_psnr(vae, images):.1f} dB")
    latents = load_or_encode(work, vae, images, device)
    say(f"latents {tuple(latents.shape)}")
    if args.prepare_only:
        return None
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
    data = EncodedData(latents=latents, input_ids=ids, empty_ids=empty)
    del images

    # 4. the generator
    from diffusers import DDPMScheduler

    from dallecli.training.emoji_judge import EmojiJudge

    scheduler_config = noise_scheduler_config()
    torch.manual_seed(args.seed)
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                      hidden_size=size.text_hidden, layers=size.text_layers)
    unet = build_unet(latents.shape[1], latents.shape[-1], channels=size.unet_channels,
                      cross_attention_dim=size.text_hidden)
    forward = unet_forward_seconds(unet, size.text_hidden)
    say(f"model: UNet {parameter_megabytes(unet):.1f} MB + text encoder {parameter_megabytes(text_encoder):.1f} MB "
        f"+ VAE {parameter_megabytes(vae):.1f} MB (float32); guided UNet call {forward * 1000:.0f} ms on 2 threads")
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=200,
        seed=args.seed, caption_dropout=0.1, ema_max_decay=0.9995, snr_gamma=5.0, snr_floor=1.0,
        high_noise_fraction=args.high_noise_fraction, save_every=args.save_every, weight_decay=0.0,
        mixed_precision=args.mixed_precision,
    )
    eval_settings = EvalSettings(concepts=args.eval_concepts, per_concept=args.eval_per_concept,
                                 steps=args.eval_steps)
    record = {
        "data_seed": args.seed, "images": args.images, "concepts": args.concepts, "subset": args.subset,
        "concept_count": len(concepts), "size": asdict(size),
        "trainer": asdict(settings), "eval": asdict(eval_settings), "autoencoder": asdict(ae_config),
        "max_tokens": MAX_TOKENS, "code_version": code_version(), "torch": torch.__version__,
    }
    eval_scenes = evaluation_set(concepts, eval_settings)
    judge = EmojiJudge.load(args.judge)
    ceiling = autoencoder_ceiling(vae, [scene for scene, _ in eval_scenes], judge)
    record["autoencoder_ceiling"] = ceiling
    say(f"the evaluation scenes through the autoencoder (the generator's ceiling): {ceiling}")
    run = Run(work, args.compact, record, eval_scenes, eval_settings, judge, say, args.eval_every, deadline, stop)
    noise_scheduler = DDPMScheduler(**scheduler_config)
    trainer, step = train(run, unet, text_encoder, tokenizer, vae, noise_scheduler, data, settings,
                          args.resume_from_compact)
    if step < settings.steps:
        say(f"stopped at step {step}/{settings.steps}; run the same command to go on")
        if not args.pipeline_on_stop:
            return None

    # 6. the pipeline, with how it was made
    with staged_folder(args.out) as staging:
        save_pipeline(trainer, unet, text_encoder, tokenizer, vae, scheduler_config, staging)
        full = dict(record, command="python -m dallecli.training.build_emoji " + " ".join(
            sys.argv[1:] if argv is None else argv), steps=step, sources=sources_record(),
            subject=SUBJECT, words=sorted({word for text in captions for word in words_of(text)}),
            curve=read_curve(work), wall_time_s=round(time.time() - started))
        (staging / "training.json").write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(work / "log.txt", staging / "training-log.txt")
    pipe = make_pipeline(unet, text_encoder, tokenizer, vae, scheduler_config).to(trainer.accelerator.device)
    with trainer.averaged_weights():
        save_png(sample_grid(pipe, SAMPLE_PROMPTS, seeds=range(4)), work / f"samples-{step:07d}.png")
    say(f"wrote {args.out} ({step} steps, {time.time() - started:.0f} s)")
    return args.out


if __name__ == "__main__":
    main()
