"""An independent judge for the emoji world: which concept a 64x64 image shows, and where, how large, on what.

    python -m dallecli.training.emoji_judge            # train (resumable) into build/emoji-judge, then evaluate
    python -m dallecli.training.emoji_judge --check    # evaluate the saved judge only

The concept judge is a small CNN (:class:`JudgeNet`, pure torch) trained on the clean emoji composed with
augmentation: random plain, gradient and arbitrary-colour backgrounds, any position, extents 12..40 pixels, light
blur and noise. It never sees a generator's output, so it can score one. Its weights are safetensors
(``judge.safetensors``, the concept ids in the file's metadata) with ``concepts.json`` beside them; training
checkpoints go through :mod:`dallecli.training.checkpoint` and are deterministic for a seed (each step's batch is
drawn from ``seed + step``, so a resumed run equals an uninterrupted one).

:func:`detect_scene` reads background (plain or gradient), size and position from the pixels, as
:func:`dallecli.training.adherence.detect` does for shapes, but with the background modelled per pixel (a
gradient too) and the object taken as every pixel that differs from it, whatever its colours.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dallecli.atomic import default_mode, staged_folder, write_file
from dallecli.training import emoji_world as world
from dallecli.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dallecli.training.emoji_source import DEFAULT_CACHE, SELECTIONS, Concept, load_concepts

DEFAULT_OUT = Path("build/emoji-judge")
WEIGHTS = "judge.safetensors"
PALETTE_NAMES = list(world.BACKGROUNDS)
PALETTE = np.array([world.BACKGROUNDS[n] for n in PALETTE_NAMES], dtype=np.float32)  # (9, 3)
OBJECT_THRESHOLD = 40.0  # RGB distance from the modelled background that marks an object pixel
GRADIENT_THRESHOLD = 60.0  # RGB distance between opposite edges that makes the background a gradient
CROP = 32  # side of the object's crop the network reads, pixels
CROP_MARGIN = 1.15  # the crop's side over the object's longer side


@dataclass(frozen=True)
class JudgeConfig:
    """How the judge is built and trained (saved with it)."""

    width: int = 32  # channels of the first stage; then x2, x4, x8
    steps: int = 900  # 13.6 min on 2 shared CPU cores; top-1 0.988 on 820 concepts
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    min_extent: int = 12
    max_extent: int = 40
    seed: int = 0


class JudgeNet(nn.Module):
    """A plain CNN on the object's crop: (B, 3, 32, 32) RGB in [0, 1] -> (B, concepts) logits.

    Stride-2 convolutions take 32 -> 16 -> 8 -> 4, then global average pooling and one linear layer; about
    0.5M parameters for 800 concepts (a third of them in the classifier).
    """

    def __init__(self, classes: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        w = width
        self.features = nn.Sequential(
            block(3, w, 1),  # (B, w, 32, 32)
            block(w, 2 * w, 2),  # (B, 2w, 16, 16)
            block(2 * w, 3 * w, 2),  # (B, 3w, 8, 8)
            block(3 * w, 3 * w, 1),
            block(3 * w, 6 * w, 2),  # (B, 6w, 4, 4)
        )
        self.head = nn.Linear(6 * w, classes)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) floats in [0, 1] -> (B, classes) logits."""
        x = self.features(crops * 2 - 1)
        return self.head(x.mean(dim=(2, 3)))  # (B, 6w) -> (B, classes)


def crop(images: torch.Tensor, boxes: torch.Tensor, size: int = CROP) -> torch.Tensor:
    """Cut each image's object out as a square ``size`` x ``size`` view (bilinear, edges replicated).

    Args:
        images: (B, 3, H, W) floats.
        boxes: (B, 4) bounding boxes ``x0, y0, x1, y1`` in pixels (inclusive corners).
        size: the crop's side, pixels.

    Returns:
        (B, 3, size, size): a square around each box's centre, its side the box's longer side times
        :data:`CROP_MARGIN` (at least 8 pixels).
    """
    b, _, h, w = images.shape
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    side = ((boxes[:, 2:] - boxes[:, :2]).max(dim=1).values + 1) * CROP_MARGIN
    side = side.clamp(min=8.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side / w, side / h
    theta[:, 0, 2], theta[:, 1, 2] = (cx + 0.5) * 2 / w - 1, (cy + 0.5) * 2 / h - 1
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------- data

def _random_background(rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) float32: a palette colour (50%), an arbitrary colour (20%) or a gradient (30%)."""
    roll = rng.random()
    if roll < 0.5:
        return world.background_array(PALETTE_NAMES[rng.integers(len(PALETTE_NAMES))])
    if roll < 0.7:
        return np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (64, 64, 3)).copy()
    start, end = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[:, None] * (end - start) + start  # (64, 3)
    return np.broadcast_to(ramp[:, None] if rng.random() < 0.5 else ramp[None], (64, 64, 3)).copy()


def augmented_batch(concepts: list[Concept], size: int, seed: int, config: JudgeConfig) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """A training batch drawn from ``seed`` alone (reproducible).

    Each image is a random background with one emoji (extent ``min_extent..max_extent`` pixels, anywhere),
    lightly blurred (sigma 0..1.2 pixels), brightened or darkened (+-10%) and noised (std 0..0.04), then
    cropped around the emoji's box jittered by about 5% of its size, as a detector would find it.

    Returns:
        ``(crops, labels)``: (size, 3, 32, 32) float32 in [0, 1] and (size,) int64 concept indices.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(concepts), size=size)
    images = np.empty((size, 64, 64, 3), dtype=np.float32)
    boxes = np.empty((size, 4), dtype=np.float32)
    for i, label in enumerate(labels):
        canvas = _random_background(rng)
        tile = world.sprite(concepts[label].image, int(rng.integers(config.min_extent, config.max_extent + 1)))
        height, width = tile.shape[:2]
        top, left = int(rng.integers(0, 64 - height + 1)), int(rng.integers(0, 64 - width + 1))
        world._paste(canvas, tile[..., :3], tile[..., 3:], top, left)
        images[i] = canvas
        jitter = rng.normal(0, 1.0, 4) * max(height, width) * 0.05  # a detector's box is a little off
        boxes[i] = np.array([left, top, left + width - 1, top + height - 1]) + jitter
    batch = torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0  # (B, 3, 64, 64)
    generator = torch.Generator().manual_seed(seed)
    batch = _blur(batch, torch.rand(size, generator=generator) * 1.2, generator)
    gain = 1 + (torch.rand(size, 1, 1, 1, generator=generator) - 0.5) * 0.2  # brightness +-10%
    noise = torch.randn(batch.shape, generator=generator) * torch.rand(size, 1, 1, 1, generator=generator) * 0.04
    batch = (batch * gain + noise).clamp(0, 1)
    return crop(batch, torch.from_numpy(boxes)), torch.from_numpy(labels)


def _blur(batch: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian-blur each image (B, 3, H, W) with its own sigma (B,) in pixels (below 0.3: untouched)."""
    offsets = torch.arange(-2, 3, dtype=torch.float32)  # a 5-tap kernel
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma.clamp(min=0.3)[:, None] ** 2))  # (B, 5)
    kernel = torch.where(sigma[:, None] < 0.3, (offsets == 0).float()[None], kernel)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    b, c, h, w = batch.shape
    flat = batch.reshape(1, b * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)  # (B*3, 5)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def clean_scenes(concepts: list[Concept], per_concept: int, seed: int) -> list[world.EmojiScene]:
    """Evaluation scenes: each concept ``per_concept`` times, on its allowed plain or gradient backgrounds,
    at a named size and position (the generator's test distribution, drawn without augmentation)."""
    rng = random.Random(seed)
    scenes = []
    for concept in concepts:
        for _ in range(per_concept):
            allowed = world.allowed_backgrounds(concept)
            background = rng.choice(allowed)
            to = rng.choice([b for b in allowed if b != background]) if rng.random() < 0.25 else None
            size_word, position_word = rng.choice(list(world.SIZES)), rng.choice(world.POSITIONS)
            extent = rng.randint(*world.SIZES[size_word])
            cx, cy = world.place(position_word, extent, rng)
            scenes.append(world.EmojiScene(concept, background, extent, cx, cy, size_word, position_word, True,
                                           to, rng.choice(world.GRADIENTS) if to else None))
    return scenes


# ---------------------------------------------------------------------------------------------- the judge

class EmojiJudge:
    """A trained :class:`JudgeNet` with its concept ids; names the concept of 64x64 images."""

    def __init__(self, net: JudgeNet, concept_ids: list[str], config: JudgeConfig):
        self.net = net.eval()
        self.concept_ids = list(concept_ids)
        self.config = config
        self._index = {cid: i for i, cid in enumerate(self.concept_ids)}

    @classmethod
    def load(cls, folder: Path = DEFAULT_OUT) -> EmojiJudge:
        """Read ``judge.safetensors`` + ``concepts.json`` (no pickle)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        folder = Path(folder)
        with safe_open(folder / WEIGHTS, framework="pt") as handle:
            metadata = handle.metadata() or {}
        record = json.loads((folder / "concepts.json").read_text(encoding="utf-8"))
        ids = [c["id"] for c in record["concepts"]]
        if metadata.get("concept_ids") and json.loads(metadata["concept_ids"]) != ids:
            raise ValueError(f"{folder}: concepts.json does not match the weights' concept list")
        config = JudgeConfig(**record["config"])
        net = JudgeNet(len(ids), config.width)
        net.load_state_dict(load_file(folder / WEIGHTS))
        return cls(net, ids, config)

    def save(self, folder: Path, concepts: list[Concept], figures: dict | None = None) -> Path:
        """Write the weights (concept ids in the safetensors metadata) and ``concepts.json``, atomically."""
        from safetensors.torch import save_file

        metadata = {"concept_ids": json.dumps(self.concept_ids), "format": "pt"}
        record = {"config": asdict(self.config), "figures": figures or {},
                  "concepts": [{"id": c.id, "char": c.char, "name": c.name, "category": c.category}
                               for c in concepts]}
        with staged_folder(Path(folder), what=f"the emoji judge in {folder}") as staging:
            state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
            save_file(state, staging / WEIGHTS, metadata=metadata)
            default_mode(staging / WEIGHTS)  # safetensors' writer makes it 0600
            (staging / "concepts.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return Path(folder)

    @torch.no_grad()
    def logits(self, images) -> torch.Tensor:
        """Concept logits for 64x64 images: a list of PIL images or a uint8 array (N, 64, 64, 3) ->
        (N, concepts). Each image is read in the square around its object (:func:`object_box`; the whole
        image when no object stands out)."""
        arrays = _as_array(images)  # (N, 64, 64, 3) uint8
        if not len(arrays):
            return torch.zeros(0, len(self.concept_ids))
        boxes = torch.tensor([object_box(a) or (0, 0, a.shape[1] - 1, a.shape[0] - 1) for a in arrays],
                             dtype=torch.float32)  # (N, 4)
        batch = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, 64, 64)
        crops = crop(batch, boxes)  # (N, 3, 32, 32)
        return torch.cat([self.net(part) for part in crops.split(256)])

    def classify(self, images, k: int = 5) -> list[list[str]]:
        """The ``k`` most likely concept ids of each image, most likely first."""
        return [[self.concept_ids[i] for i in row] for row in self.logits(images).topk(k, dim=1).indices.tolist()]

    def concept_accuracy(self, images, concepts) -> dict:
        """Top-1 and top-5 accuracy of naming each image's concept.

        Args:
            images: N 64x64 images (PIL, or a uint8 array (N, 64, 64, 3)).
            concepts: N :class:`Concept` (or concept ids) the images should show.

        Returns:
            ``{"top1": float, "top5": float, "n": int}``; a concept the judge does not know counts as a miss.
        """
        wanted = [c.id if isinstance(c, Concept) else str(c) for c in concepts]
        if len(wanted) != len(images):
            raise ValueError(f"concept_accuracy: {len(images)} images but {len(wanted)} concepts")
        top = self.logits(images).topk(min(5, len(self.concept_ids)), dim=1).indices  # (N, 5)
        target = torch.tensor([self._index.get(cid, -1) for cid in wanted])
        top1 = (top[:, 0] == target).float().mean().item() if len(wanted) else 0.0
        top5 = (top == target[:, None]).any(dim=1).float().mean().item() if len(wanted) else 0.0
        return {"top1": round(top1, 4), "top5": round(top5, 4), "n": len(wanted)}


def concept_accuracy(images, concepts, judge: EmojiJudge | None = None) -> dict:
    """Top-1/top-5 concept accuracy of images by the judge (default: the one saved in build/emoji-judge).

    Args:
        images: N 64x64 images (PIL, or a uint8 array (N, 64, 64, 3)).
        concepts: N :class:`Concept` or concept ids.
        judge: a loaded :class:`EmojiJudge`.

    Returns:
        ``{"top1", "top5", "n"}``.
    """
    return (judge or EmojiJudge.load()).concept_accuracy(images, concepts)


def _as_array(images) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return np.ascontiguousarray(images, dtype=np.uint8)
    return np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8)
                     for im in images]) if len(images) else np.zeros((0, 64, 64, 3), np.uint8)


# ---------------------------------------------------------------------------------------------- training

def train_judge(concepts: list[Concept], config: JudgeConfig = JudgeConfig(), checkpoints: Path | None = None,
                save_every: int = 200, on_step=None) -> EmojiJudge:
    """Train a judge from scratch or resume it from ``checkpoints`` (safetensors, :mod:`checkpoint`).

    Args:
        concepts: the classes, in order.
        config: the network and schedule (AdamW, one-cycle learning rate, label smoothing).
        checkpoints: folder for resumable checkpoints, or None for none.
        save_every: steps between checkpoints.
        on_step: called as ``on_step(step, loss)`` after every step.

    Returns:
        The trained judge (in eval mode).
    """
    torch.manual_seed(config.seed)
    net = JudgeNet(len(concepts), config.width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps,
                                                   pct_start=0.15)
    step = 0
    found = list_checkpoints(checkpoints) if checkpoints else []
    if found:
        step, state = load_checkpoint(found[-1])
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    net.train()
    while step < config.steps:
        images, labels = augmented_batch(concepts, config.batch_size, config.seed * 1_000_003 + step, config)
        loss = F.cross_entropy(net(images), labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if on_step:
            on_step(step, loss.item())
        if checkpoints and (step % save_every == 0 or step == config.steps):
            save_checkpoint(checkpoints, step, {"net": net.state_dict(), "optimizer": optimizer.state_dict(),
                                                "schedule": schedule.state_dict()})
    return EmojiJudge(net, [c.id for c in concepts], config)


# ---------------------------------------------------------------------------------------------- detection

@dataclass(frozen=True)
class SceneDetection:
    """What an emoji-world image shows apart from the concept: names from the world, None when not found."""

    background: str  # the plain colour, or the gradient's top/left colour
    background_to: str | None  # the gradient's other end, None for a plain background
    gradient: str | None  # "vertical", "horizontal" or None
    size: str | None  # "small", "medium", "large"
    position: str | None  # one of world.POSITIONS


def _nearest(rgb: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def _axis_word(centre: float, low_word: str, high_word: str) -> str:
    return low_word if centre < 26 else high_word if centre > 38 else "center"  # as adherence.detect


def position_word(cx: float, cy: float) -> str:
    """The position word of a bounding-box centre (pixels on a 64-pixel canvas), as adherence.detect names it."""
    horizontal, vertical = _axis_word(cx, "left", "right"), _axis_word(cy, "top", "bottom")
    if horizontal == "center" and vertical == "center":
        return "center"
    if horizontal == "center" or vertical == "center":
        return vertical if horizontal == "center" else horizontal
    return f"{vertical} {horizontal}"


def size_word(extent: float) -> str:
    """small (14..18 pixels), medium (24..29) or large (34..38): thresholds half-way between the ranges."""
    return "small" if extent < 21.5 else "large" if extent > 31.5 else "medium"


def _background_model(pixels: np.ndarray) -> tuple[np.ndarray, str, str | None, str | None]:
    """(model (H, W, 3) or (3,), background, background_to, gradient) from the outermost rows and columns."""
    height, width, _ = pixels.shape
    top, bottom = np.median(pixels[0], axis=0), np.median(pixels[-1], axis=0)
    left, right = np.median(pixels[:, 0], axis=0), np.median(pixels[:, -1], axis=0)
    vertical, horizontal = np.linalg.norm(top - bottom), np.linalg.norm(left - right)
    if max(vertical, horizontal) > GRADIENT_THRESHOLD:
        if vertical >= horizontal:
            ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
            return top + (bottom - top) * ramp, _nearest(top), _nearest(bottom), "vertical"
        ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
        return left + (right - left) * ramp, _nearest(left), _nearest(right), "horizontal"
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2W + 2H, 3)
    model = np.median(border, axis=0)
    return model, _nearest(model), None, None


def object_box(image) -> tuple[int, int, int, int] | None:
    """The bounding box ``(x0, y0, x1, y1)`` (inclusive, pixels) of every pixel farther than
    :data:`OBJECT_THRESHOLD` from the modelled background, or None when fewer than 12 pixels are."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    model = _background_model(pixels)[0]
    mask = np.sqrt(((pixels - model) ** 2).sum(axis=2)) > OBJECT_THRESHOLD  # (H, W)
    if mask.sum() < 12:
        return None
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def detect_scene(image) -> SceneDetection:
    """Detect background (plain or gradient), size and position in a 64x64 RGB emoji-world image.

    The background is modelled from the image's outermost rows and columns: when the top and bottom rows (or
    the left and right columns) differ by more than :data:`GRADIENT_THRESHOLD` it is a linear gradient between
    them, else one colour. Every pixel farther than :data:`OBJECT_THRESHOLD` from that model is the object's;
    its bounding box (:func:`object_box`) gives the size (longer side) and the position (centre).
    """
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    height, width, _ = pixels.shape
    _, background, background_to, gradient = _background_model(pixels)
    box = object_box(pixels)
    if box is None:
        return SceneDetection(background, background_to, gradient, None, None)
    x0, y0, x1, y1 = box
    extent = max(x1 - x0 + 1, y1 - y0 + 1) * 64 / max(width, height)
    cx, cy = (x0 + x1) / 2 * 64 / width, (y0 + y1) / 2 * 64 / height
    return SceneDetection(background, background_to, gradient, size_word(extent), position_word(cx, cy))


def score_scenes(scenes: list[world.EmojiScene], detections: list[SceneDetection]) -> dict[str, dict]:
    """Accuracy of background (both ends of a gradient), size and position, each with its count."""
    tallies: dict[str, list[bool]] = {"background": [], "size": [], "position": []}
    for scene, found in zip(scenes, detections):
        if scene.show_background:
            tallies["background"].append((found.background, found.background_to, found.gradient)
                                         == (scene.background, scene.background_to, scene.gradient))
        if scene.size_word:
            tallies["size"].append(found.size == scene.size_word)
        if scene.position_word:
            tallies["position"].append(found.position == scene.position_word)
    return {k: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)} for k, v in tallies.items() if v}


def evaluate_judge(judge: EmojiJudge, concepts: list[Concept], per_concept: int = 4, seed: int = 4321) -> dict:
    """Score the judge and the scene detector on clean renders of every concept (:func:`clean_scenes`).

    Returns:
        ``{"concept": {"top1", "top5", "n"}, "background"|"size"|"position": {"accuracy", "n"},
        "confusions": [[wanted name, judged name, count], ...] (the ten most frequent)}``.
    """
    scenes = clean_scenes(concepts, per_concept, seed)
    images = np.stack([world.render_array(scene) for scene in scenes])  # (N, 64, 64, 3)
    result = {"concept": judge.concept_accuracy(images, [s.concept for s in scenes])}
    result.update(score_scenes(scenes, [detect_scene(image) for image in images]))
    names = {c.id: c.name for c in concepts}
    judged = [row[0] for row in judge.classify(images, k=1)]
    pairs: dict[tuple[str, str], int] = {}
    for scene, got in zip(scenes, judged):
        if got != scene.concept.id:
            key = (scene.concept.name, names.get(got, got))
            pairs[key] = pairs.get(key, 0) + 1
    result["confusions"] = [[a, b, n] for (a, b), n in sorted(pairs.items(), key=lambda kv: -kv[1])[:10]]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the judge's folder")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="emoji sources (emoji_source)")
    parser.add_argument("--selection", choices=sorted(SELECTIONS), default="everyday")
    parser.add_argument("--check", action="store_true", help="evaluate the saved judge, do not train")
    parser.add_argument("--steps", type=int, default=JudgeConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-concept", type=int, default=4, help="clean renders per concept to evaluate")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    concepts = load_concepts(args.cache, args.selection)
    started = time.time()
    if args.check:
        judge = EmojiJudge.load(args.out)
        by_id = {c.id: c for c in concepts}
        concepts = [by_id[cid] for cid in judge.concept_ids if cid in by_id]
    else:
        config = JudgeConfig(steps=args.steps, seed=args.seed)
        checkpoints = args.out.parent / (args.out.name + "-checkpoints")

        def report(step: int, loss: float) -> None:
            if step % 100 == 0:
                print(f"step {step}/{config.steps} loss {loss:.3f} "
                      f"{time.time() - started:.0f} s", flush=True)

        judge = train_judge(concepts, config, checkpoints, on_step=report)
    figures = evaluate_judge(judge, concepts, args.per_concept)
    figures["concepts"] = len(concepts)
    if not args.check:
        figures["train_seconds"] = round(time.time() - started)
        judge.save(args.out, concepts, figures)
        write_file(args.out / "figures.json", json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
