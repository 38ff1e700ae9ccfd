"""Train the embedded scorer ("shapes-clip"): a small CLIP that rates how well a shapes-world image matches a text.

    python -m dallecli.training.build_scorer --out src/dallecli/models/shapes-clip

A ``transformers.CLIPModel`` (ViT image tower on 64x64 pixels in 16x16 patches, text tower with the embedded
model's own tokenizer) trained from scratch with CLIP's symmetric contrastive loss (Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision") on rendered scenes
(:mod:`dallecli.training.shapes`). In-batch negatives alone rarely differ from the positive in just one word,
and CLIPs trained that way read a caption as a bag of words (Yuksekgonul et al. 2023, "When and why
vision-language models behave like bags-of-words, and what to do about it"); so, as their NegCLIP does, every
image also meets a hard negative caption: its own scene with one attribute changed (colour, shape, background,
size or position). Images get light blur and noise so that the scorer also reads the generator's softer output.

The folder written loads with ``CLIPModel.from_pretrained(path, use_safetensors=True)`` and
``CLIPProcessor.from_pretrained(path)``; ``training.json`` records how it was made and its held-out accuracy per
attribute (the share of held-out images for which the true caption scores above its one-attribute-changed twin).
``python -m dallecli.training.build_default`` runs this as its last stage.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dallecli.atomic import staged_folder
from dallecli.scoring.clip import projected
from dallecli.training import shapes
from dallecli.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dallecli.training.worklog import work_log

ATTRIBUTES = ("colour", "shape", "background", "size", "position")
MAX_TOKENS = 32  # as the embedded model's text encoder
IMAGE_SIZE = 64


def build_model(vocab_size: int, bos: int, eos: int):
    """A CLIPModel of ~0.9M parameters: text tower 2 layers x 128; image tower 4 layers x 96 over 16 patches of
    16x16 pixels (a 4x4 grid, fine enough for the world's 3x3 positions); 128-d embeddings."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": MAX_TOKENS, "bos_token_id": bos,
                     "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                       "image_size": IMAGE_SIZE, "patch_size": 16},
        projection_dim=128,
    )
    return CLIPModel(config)


def image_processor():
    """Pixels to the image tower's input: resized to 64x64 (bicubic), scaled to [-1, 1]."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)


def altered(scene: shapes.Scene, attribute: str, rng: random.Random) -> shapes.Scene | None:
    """``scene`` with one attribute changed to another value its caption can state, or None when the caption
    does not state that attribute (no size or position word) so that no changed caption contradicts the image."""
    if attribute == "colour":
        colour = rng.choice([c for c in shapes.COLOURS if c not in (scene.colour, scene.background)])
        return replace(scene, colour=colour)
    if attribute == "shape":
        return replace(scene, shape=rng.choice([s for s in shapes.SHAPES if s != scene.shape]))
    if attribute == "background":
        if not scene.show_background:
            return None
        return replace(scene, background=rng.choice([b for b in shapes.BACKGROUNDS
                                                     if b not in (scene.background, scene.colour)]))
    if attribute == "size":
        return replace(scene, size_word="large" if scene.size_word == "small" else "small") if scene.size_word else None
    if scene.position_word is None:
        return None
    return replace(scene, position_word=rng.choice([p for p in shapes.POSITIONS if p != scene.position_word]))


def make_data(count: int, seed: int) -> tuple[torch.Tensor, list[str], list[str], list[str]]:
    """Rendered scenes with, for each, a true caption, a hard negative caption and the attribute changed.

    Returns:
        ``(images (N, 3, 64, 64) uint8, captions, negatives, changed attribute names)``.
    """
    rng = random.Random(seed)
    images, captions, negatives, changed = [], [], [], []
    while len(captions) < count:
        scene = shapes.sample_scene(rng)
        attribute = rng.choice(ATTRIBUTES)
        other = altered(scene, attribute, rng)
        if other is None:
            continue
        state = rng.getstate()  # the same template and word order for both captions: only the attribute differs
        true_caption = shapes.caption(scene, rng)
        rng.setstate(state)
        negative = shapes.caption(other, rng)
        if negative == true_caption:  # the template left the attribute out ("a small shape ...")
            continue
        images.append(np.asarray(shapes.render(scene)))
        captions.append(true_caption)
        negatives.append(negative)
        changed.append(attribute)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions, negatives, changed


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, 64, 64) in [-1, 1] -> the same with a random light blur (half of the images) and Gaussian noise."""
    import torch.nn.functional as F

    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(pixels.shape[0], 1, 1, 1, generator=generator) < 0.5).float()
    mixed = pick * (0.5 * pixels + 0.5 * blurred) + (1 - pick) * pixels
    sigma = torch.rand(pixels.shape[0], 1, 1, 1, generator=generator) * 0.06
    return mixed + sigma * torch.randn(pixels.shape, generator=generator)


def to_model_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, 64, 64) -> float (B, 3, 64, 64) in [-1, 1], what :func:`image_processor` gives."""
    return images.float() / 127.5 - 1


def contrastive_loss(model, pixels: torch.Tensor, ids: torch.Tensor, negative_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the (B, B) similarity matrix, with each image's hard negative caption
    added as B more candidate texts for the image-to-text direction (NegCLIP)."""
    import torch.nn.functional as F

    image = F.normalize(projected(model.get_image_features(pixel_values=pixels)), dim=-1)  # (B, D)
    texts = F.normalize(projected(model.get_text_features(input_ids=trimmed(torch.cat([ids, negative_ids])))), dim=-1)  # (2B, D)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * image @ texts.T  # (B, 2B)
    targets = torch.arange(pixels.shape[0])
    image_to_text = F.cross_entropy(logits, targets)
    text_to_image = F.cross_entropy(logits[:, : pixels.shape[0]].T, targets)
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def held_out_accuracy(model, tokenizer, images: torch.Tensor, captions: list[str], negatives: list[str],
                      changed: list[str]) -> dict[str, float]:
    """Per attribute: the share of images whose true caption scores above its one-attribute-changed twin."""
    import torch.nn.functional as F

    model.eval()
    wins: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for start in range(0, len(captions), 256):
        end = start + 256
        image = F.normalize(projected(model.get_image_features(pixel_values=to_model_pixels(images[start:end]))), dim=-1)
        ids = tokenize(tokenizer, captions[start:end])
        negative_ids = tokenize(tokenizer, negatives[start:end])
        true = (image * F.normalize(projected(model.get_text_features(input_ids=ids)), dim=-1)).sum(-1)
        false = (image * F.normalize(projected(model.get_text_features(input_ids=negative_ids)), dim=-1)).sum(-1)
        for attribute, won in zip(changed[start:end], (true > false).tolist()):
            wins[attribute].append(won)
    model.train()
    return {a: round(sum(w) / len(w), 4) for a, w in wins.items() if w}


def trimmed(ids: torch.Tensor) -> torch.Tensor:
    """(B, 32) token ids -> (B, L), cut after the batch's longest text. Exact: the text tower's attention is
    causal and it pools at the first end-of-text token, so the padding after it changes nothing."""
    pad = ids[0, -1].item()  # padding is the end-of-text token
    longest = int((ids != pad).sum(dim=1).max()) + 1
    return ids[:, :longest]


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt").input_ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="scorer folder to write")
    parser.add_argument("--tokenizer", type=Path, default=Path(__file__).parents[1] / "models" / "shapes" / "tokenizer",
                        help="the embedded model's tokenizer folder (the scorer reads prompts with the same tokens)")
    parser.add_argument("--work", type=Path, default=Path("build/scorer-work"), help="checkpoints (resumable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--steps", type=int, default=6_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import CLIPProcessor, CLIPTokenizer

    say = work_log(args.work)

    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    images, captions, negatives, _ = make_data(args.images, args.seed)
    eval_images, eval_captions, eval_negatives, eval_changed = make_data(2_000, args.seed + 10_000)
    ids, negative_ids = tokenize(tokenizer, captions), tokenize(tokenizer, negatives)
    say(f"rendered {len(captions)} training and {len(eval_captions)} held-out scenes")

    torch.manual_seed(args.seed)
    model = build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + np.cos(np.pi * min(s, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    found = list_checkpoints(args.work / "checkpoints")
    if found:  # weights, optimizer moments, schedule and the data generator's state
        step, state = load_checkpoint(found[-1])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        say(f"resumed at step {step}")
    started, first = time.time(), step
    model.train()
    while step < args.steps:
        batch = torch.randint(0, len(captions), (args.batch_size,), generator=generator)
        pixels = augment(to_model_pixels(images[batch]), generator)
        loss = contrastive_loss(model, pixels, ids[batch], negative_ids[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        if step % 50 == 0:
            say(f"step {step}/{args.steps} loss {loss.item():.4f} {(step - first) / (time.time() - started):.2f} steps/s")
        if step % args.save_every == 0 or step == args.steps:
            accuracy = held_out_accuracy(model, tokenizer, eval_images, eval_captions, eval_negatives, eval_changed)
            say(f"step {step}: held-out accuracy {json.dumps(accuracy)}")
            save_checkpoint(args.work / "checkpoints", step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "generator": generator.get_state()})

    accuracy = held_out_accuracy(model, tokenizer, eval_images, eval_captions, eval_negatives, eval_changed)
    with staged_folder(args.out) as staging:
        model.eval().save_pretrained(staging, safe_serialization=True)
        CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(staging)
        image_processor().save_pretrained(staging)  # preprocessor_config.json, what transformers 4.x reads
        record = {
            "command": "python -m dallecli.training.build_scorer " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed, "images": args.images, "steps": args.steps, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "parameters": sum(p.numel() for p in model.parameters()),
            "held_out_accuracy": accuracy, "held_out_images": len(eval_captions), "torch": torch.__version__,
            "loss": "CLIP symmetric InfoNCE + one hard negative caption per image (NegCLIP)",
        }
        (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(args.work / "log.txt", staging / "training-log.txt")
    say(f"wrote {args.out}: held-out accuracy {json.dumps(accuracy)}")


if __name__ == "__main__":
    main()
