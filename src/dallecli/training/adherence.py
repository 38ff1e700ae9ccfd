"""Measure how well a model follows shapes-world prompts, by detecting what it drew from the pixels.

    python -m dallecli.training.adherence [--model PATH] [--per-category 120] [--check-detector]
    python -m dallecli.training.adherence --rerank 4 [--scorer NAME]   # each image the best of 4 by CLIP

The detector reads an image as the shapes world draws it: the background is the dominant colour of the
border, the object is the pixels past the half-way point between background and object colour; colour is the
object's median colour (nearest palette entry), shape comes from how it tapers (triangle) and whether it
fills its bounding box's corners (square) or not (circle), size from its extent, position from the centre
of its bounding box. ``--check-detector`` scores the ground-truth renderer's
own images, which should give 1.0 everywhere.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass

import numpy as np

from dallecli.training import shapes

PALETTE_NAMES = list(shapes.BACKGROUNDS)
PALETTE = np.array([shapes.BACKGROUNDS[n] for n in PALETTE_NAMES], dtype=np.float32)  # (9, 3)
OBJECT_THRESHOLD = 60.0  # RGB distance from the background that marks an object pixel


@dataclass(frozen=True)
class Detection:
    """What an image shows: names from the shapes world, or None when no object was found."""

    background: str
    colour: str | None
    shape: str | None
    size: str | None  # "small", "medium" or "large"
    position: str | None  # one of shapes.POSITIONS


def nearest(rgb: np.ndarray, names: list[str]) -> str:
    """The palette name in ``names`` closest to ``rgb`` (3,) in RGB distance."""
    rows = [PALETTE_NAMES.index(n) for n in names]
    return names[int(np.argmin(((PALETTE[rows] - rgb) ** 2).sum(axis=1)))]


def _axis_word(centre: float, low_word: str, high_word: str) -> str:
    if centre < 26:
        return low_word
    if centre > 38:
        return high_word
    return "center"


def _classify_shape(mask: np.ndarray) -> str:
    """Square, circle or (upward) triangle from a binary mask cropped to its bounding box.

    Two measurements that anti-aliasing and slight blur do not move much: how much narrower the shape is
    near its top than near its bottom (a triangle tapers to its apex), and how much of the bounding box's
    corners it covers (a square fills them, a circle leaves them empty).
    """
    height, width = mask.shape
    rows = mask.sum(axis=1)  # (h,) width of the shape per row
    top = rows[int(height * 0.2):max(int(height * 0.3), int(height * 0.2) + 1)].mean()
    bottom = rows[int(height * 0.7):max(int(height * 0.8), int(height * 0.7) + 1)].mean()
    if bottom > 0 and top / bottom < 0.6:
        return "triangle"
    cy, cx = max(1, round(height * 0.2)), max(1, round(width * 0.2))
    corners = [mask[:cy, :cx], mask[:cy, -cx:], mask[-cy:, :cx], mask[-cy:, -cx:]]
    coverage = float(np.mean([c.mean() for c in corners]))
    return "square" if coverage > 0.5 else "circle"


def detect(image) -> Detection:
    """Detect background, object colour, shape, size and position in a 64x64 RGB image (PIL or array).

    The object's outline is taken half-way between the background colour and the object's colour (the
    half-maximum contour), which is where the renderer's anti-aliased edge lies.
    """
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (4W, 3)
    labels = [nearest(p, PALETTE_NAMES) for p in border[:: max(1, len(border) // 64)]]
    background = max(set(labels), key=labels.count)
    background_rgb = np.median(border, axis=0)
    rough = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2)) > OBJECT_THRESHOLD  # (H, W)
    if rough.sum() < 12:
        return Detection(background, None, None, None, None)
    object_rgb = np.median(pixels[rough], axis=0)
    direction = object_rgb - background_rgb
    along = ((pixels - background_rgb) @ direction) / max(float(direction @ direction), 1e-6)  # (H, W), 0=bg 1=object
    mask = along > 0.5
    if mask.sum() < 12:
        return Detection(background, None, None, None, None)
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    colour = nearest(object_rgb, list(shapes.COLOURS))
    shape = _classify_shape(mask[top:bottom + 1, left:right + 1])
    extent = max(right - left + 1, bottom - top + 1)
    size = "small" if extent < 24 else "large" if extent > 29 else "medium"
    cx, cy = (left + right) / 2 * 64 / width, (top + bottom) / 2 * 64 / height  # bounding-box centre
    horizontal, vertical = _axis_word(cx, "left", "right"), _axis_word(cy, "top", "bottom")
    if horizontal == "center" and vertical == "center":
        position = "center"
    elif horizontal == "center":
        position = vertical
    elif vertical == "center":
        position = horizontal
    else:
        position = f"{vertical} {horizontal}"
    return Detection(background, colour, shape, size, position)


def evaluation_scenes(per_category: int, seed: int) -> dict[str, list[shapes.Scene]]:
    """Prompts to score, as scenes: ``held_out_pairs`` (purple triangle, orange square, green circle),
    ``held_out_background`` (yellow objects on blue) and ``in_distribution`` (training combinations with
    new seeds; every prompt names the background, half name the size, half the position)."""
    rng = random.Random(seed)
    out: dict[str, list[shapes.Scene]] = {"held_out_pairs": [], "held_out_background": [], "in_distribution": []}
    pairs = sorted(shapes.HELD_OUT_PAIRS)
    for i in range(per_category):
        colour, shape = pairs[i % len(pairs)]
        background = rng.choice([b for b in shapes.BACKGROUNDS if b != colour])
        out["held_out_pairs"].append(shapes.Scene(shape, colour, background, 26, 32, 32))
        out["held_out_background"].append(shapes.Scene(shapes.SHAPES[i % 3], "yellow", "blue", 26, 32, 32))
    while len(out["in_distribution"]) < 2 * per_category:
        scene = shapes.sample_scene(rng)
        size_word = rng.choice(("small", "large")) if len(out["in_distribution"]) % 2 == 0 else None
        position_word = rng.choice(shapes.POSITIONS) if (len(out["in_distribution"]) // 2) % 2 == 0 else None
        extent = shapes.SIZES[size_word] if size_word else 26
        cx, cy = shapes.position_centre(position_word, extent, rng) if position_word else (32, 32)
        out["in_distribution"].append(shapes.Scene(scene.shape, scene.colour, scene.background, extent, cx, cy,
                                                   size_word, position_word, True))
    return out


def prompt_for(scene: shapes.Scene) -> str:
    """The canonical evaluation wording of a scene."""
    size = f"{scene.size_word} " if scene.size_word else ""
    where = ""
    if scene.position_word:
        where = f" in the {scene.position_word} corner" if " " in scene.position_word else (
            " in the center" if scene.position_word == "center" else f" on the {scene.position_word}")
    return f"a {size}{scene.colour} {scene.shape}{where} on a {scene.background} background"


def score(scenes: list[shapes.Scene], detections: list[Detection]) -> dict[str, dict]:
    """Accuracy per attribute, each with the number of images it is computed over."""
    tallies: dict[str, list[bool]] = {"colour": [], "shape": [], "background": [], "size": [], "position": []}
    for scene, found in zip(scenes, detections):
        tallies["colour"].append(found.colour == scene.colour)
        tallies["shape"].append(found.shape == scene.shape)
        tallies["background"].append(found.background == scene.background)
        if scene.size_word:
            tallies["size"].append(found.size == scene.size_word)
        if scene.position_word:
            tallies["position"].append(found.position == scene.position_word)
    return {k: {"accuracy": round(sum(v) / len(v), 3), "n": len(v)} for k, v in tallies.items() if v}


def evaluate(model: str | None, per_category: int = 120, seed: int = 1234, steps: int | None = None,
             guidance: float | None = None, scheduler: str | None = None, check_detector: bool = False,
             batch_size: int = 16, rerank: int | None = None, scorer: str | None = None) -> dict:
    """Generate (or, with ``check_detector``, render) every evaluation scene and score it.

    With ``rerank`` K, each scene's image is the best of K candidates (seeds s, s+1, ..., s+K-1, where s is the
    seed the image has without reranking) by the CLIP ``scorer`` (None: the embedded one), as
    ``dalle generate --rerank K`` picks it.

    Returns:
        ``{category: {attribute: {"accuracy", "n"}}, "seconds_per_image": float}`` (seconds per image kept, the
        candidates' generation and scoring included).
    """
    categories = evaluation_scenes(per_category, seed)
    results: dict = {}
    engine = None
    if not check_detector:
        from dallecli.engine.generate import Engine

        engine = Engine(model)
    clip = None
    if rerank and not check_detector:
        from dallecli.scoring.clip import ClipScorer

        clip = ClipScorer.load(scorer)
    started, count = time.perf_counter(), 0
    for category, scenes in categories.items():
        if check_detector:
            detections = [detect(shapes.render(scene)) for scene in scenes]
        else:
            from dallecli.engine.request import GenerationRequest

            shared = GenerationRequest("", steps=steps, guidance_scale=guidance, scheduler=scheduler)
            per_scene = rerank or 1
            items = [(prompt_for(scene), seed * 1000 + index + j) for index, scene in enumerate(scenes)
                     for j in range(per_scene)]
            images = []
            for start in range(0, len(items), batch_size):  # different prompts share a forward pass
                images.extend(r.image for r in engine.generate_items(items[start:start + batch_size], shared))
            if clip is not None:  # keep the best of each scene's candidates (the earlier seed on a tie)
                scores = clip.score(images, [prompt for prompt, _ in items])
                images = [images[max(range(start, start + per_scene), key=lambda i: (scores[i].cosine, -i))]
                          for start in range(0, len(images), per_scene)]
            detections = [detect(image) for image in images]
        count += len(scenes)
        results[category] = score(scenes, detections)
    results["seconds_per_image"] = round((time.perf_counter() - started) / max(count, 1), 3)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to score (default: the embedded one)")
    parser.add_argument("--per-category", type=int, default=120)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--check-detector", action="store_true", help="score the ground-truth renderer instead")
    parser.add_argument("--rerank", type=int, default=None, help="keep the best of K candidates by the scorer")
    parser.add_argument("--scorer", default=None, help="CLIP scorer for --rerank (default: the embedded one)")
    args = parser.parse_args(argv)
    result = evaluate(args.model, args.per_category, args.seed, args.steps, args.guidance, args.scheduler,
                      args.check_detector, rerank=args.rerank, scorer=args.scorer)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
