"""The emoji world: one Noto emoji composed onto a plain or gradient background, at a size and a position.

It mirrors the shapes world (:mod:`dallecli.training.shapes`): :class:`EmojiScene` describes a scene,
:func:`render` draws it as a 64x64 RGB image, :func:`caption` words it with the concept's name, a short name or
a keyword plus the shapes world's grammar ("a small rocket in the top left corner on a blue background",
"red apple, large, white background", "a blue to white gradient background with a cat face"), and
:func:`sample_scene` draws a random one. The coloured circle, square and triangle emoji are concepts too, so
the shapes world's prompts still make sense. For evaluation two things are held out of training: phrasings
(:data:`HELD_OUT_PHRASINGS`, never produced by :func:`caption` unless asked) and, for every concept, one
background and one stated position (:func:`held_out_combination`).

The concepts come from :mod:`dallecli.training.emoji_source` (fetched at build time). Usage as fine-tuning
data (``dalle finetune``-ready image + caption pairs)::

    python -m dallecli.training.emoji_source                 # fetch the sources once (npm)
    python -m dallecli.training.emoji_world --out ./emoji-data --count 200
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dallecli.training import shapes
from dallecli.training.emoji_source import DEFAULT_CACHE, SELECTIONS, Concept, load_concepts

CANVAS = shapes.CANVAS  # 64 pixels, square
BACKGROUNDS = shapes.BACKGROUNDS  # plain colours, and the two ends of a gradient
POSITIONS = shapes.POSITIONS
SIZES: dict[str, tuple[int, int]] = {"small": (14, 18), "medium": (24, 29), "large": (34, 38)}  # extent, pixels
UNNAMED_SIZE = shapes.MEDIUM_RANGE  # extent in pixels when the caption names no size (21..30)
GRADIENTS = ("vertical", "horizontal")  # first colour at the top / at the left
ALPHA_CROP = 8  # alpha (0..255) above which a pixel counts as the emoji's when cropping to its bounding box
MIN_CONTRAST = 90.0  # RGB distance a background keeps from the concept's median colour
SHAPE_WORDS = ("circle", "square", "triangle")
BLOCKED_WORDS = frozenset("shit sexy fml lmao rofl roflmao hehe hahaha muah lust ass turd dung wtf hankey".split())


@dataclass(frozen=True)
class EmojiScene:
    """One emoji on a plain or gradient background.

    Attributes:
        concept: what is drawn.
        background: a key of :data:`BACKGROUNDS`: the plain colour, or the gradient's top (vertical) or left
            (horizontal) colour.
        extent: the longer side of the emoji's bounding box (its opaque pixels), pixels (14..38).
        cx, cy: centre of that bounding box, pixels from the top-left corner.
        size_word: "small", "medium", "large" or None when the caption does not state the size.
        position_word: one of :data:`POSITIONS` or None when the caption does not state it.
        show_background: whether the caption names the background.
        background_to: the gradient's other colour (bottom or right), or None for a plain background.
        gradient: "vertical" or "horizontal" with ``background_to``, else None.
    """

    concept: Concept
    background: str
    extent: int
    cx: float
    cy: float
    size_word: str | None = None
    position_word: str | None = None
    show_background: bool = True
    background_to: str | None = None
    gradient: str | None = None

    @property
    def background_name(self) -> str:
        """The background as a caption names it: "blue" or "blue to white gradient"."""
        if self.background_to is None:
            return self.background
        kind = "gradient" if self.gradient == "vertical" else "horizontal gradient"
        return f"{self.background} to {self.background_to} {kind}"


# ---------------------------------------------------------------------------------------------- sprites

@functools.lru_cache(maxsize=None)
def sprite_source(image: Path) -> Image.Image:
    """The emoji's 64x64 RGBA image cropped to the bounding box of its opaque pixels (read once per path)."""
    with Image.open(image) as opened:
        rgba = opened.convert("RGBA")
    box = rgba.getchannel("A").point(lambda a: 255 if a > ALPHA_CROP else 0).getbbox()
    return rgba.crop(box) if box else rgba


@functools.lru_cache(maxsize=None)
def median_colour(image: Path) -> tuple[float, float, float]:
    """The median RGB of the emoji's opaque pixels (alpha > 128), 0..255."""
    pixels = np.asarray(sprite_source(image), dtype=np.float32)  # (h, w, 4)
    opaque = pixels[pixels[..., 3] > 128][:, :3]
    return tuple(float(v) for v in np.median(opaque, axis=0)) if len(opaque) else (128.0, 128.0, 128.0)


@functools.lru_cache(maxsize=65536)
def sprite(image: Path, extent: int) -> np.ndarray:
    """The emoji resized (Lanczos, aspect kept) so its longer side is ``extent`` pixels.

    Returns:
        (h, w, 4) float32: premultiplied RGB in 0..255 and alpha in 0..1, with max(h, w) == extent.
    """
    source = sprite_source(image)
    width, height = source.size
    scale = extent / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = np.asarray(source.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)  # (h, w, 4)
    alpha = resized[..., 3:] / 255.0
    return np.concatenate([resized[..., :3] * alpha, alpha], axis=2)


def alpha_mask(scene: EmojiScene) -> np.ndarray:
    """Where the emoji lies in the rendered scene: (64, 64) float32 alpha in 0..1."""
    mask = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    tile = sprite(scene.concept.image, scene.extent)
    top, left = _corner(scene, tile)
    _paste(mask[..., None], tile[..., 3:], tile[..., 3:], top, left, blend=False)
    return mask


def _corner(scene: EmojiScene, tile: np.ndarray) -> tuple[int, int]:
    height, width = tile.shape[:2]
    return round(scene.cy - height / 2), round(scene.cx - width / 2)


def _paste(canvas: np.ndarray, colour: np.ndarray, alpha: np.ndarray, top: int, left: int, blend: bool = True):
    """Composite a premultiplied tile onto ``canvas`` (H, W, C) in place, clipped to the canvas."""
    height, width = colour.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, canvas.shape[0]), min(left + width, canvas.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    piece = colour[y0 - top:y1 - top, x0 - left:x1 - left]
    if blend:
        a = alpha[y0 - top:y1 - top, x0 - left:x1 - left]
        canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - a) + piece
    else:
        canvas[y0:y1, x0:x1] = piece


def background_array(background: str, background_to: str | None = None, gradient: str | None = None,
                     size: int = CANVAS) -> np.ndarray:
    """A plain or linear-gradient background: (size, size, 3) float32 RGB in 0..255."""
    start = np.array(BACKGROUNDS[background], dtype=np.float32)
    if background_to is None:
        return np.broadcast_to(start, (size, size, 3)).copy()
    end = np.array(BACKGROUNDS[background_to], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)  # (size,)
    line = start + (end - start) * ramp[:, None]  # (size, 3)
    if gradient == "vertical":
        return np.broadcast_to(line[:, None, :], (size, size, 3)).copy()
    return np.broadcast_to(line[None, :, :], (size, size, 3)).copy()


def render_array(scene: EmojiScene) -> np.ndarray:
    """Draw a scene: (64, 64, 3) uint8 RGB."""
    canvas = background_array(scene.background, scene.background_to, scene.gradient)
    tile = sprite(scene.concept.image, scene.extent)
    top, left = _corner(scene, tile)
    _paste(canvas, tile[..., :3], tile[..., 3:], top, left)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def render(scene: EmojiScene) -> Image.Image:
    """Draw a scene as a 64x64 RGB PIL image (the emoji resized with Lanczos and alpha-composited)."""
    return Image.fromarray(render_array(scene), "RGB")


# ---------------------------------------------------------------------------------------------- sampling

def allowed_backgrounds(concept: Concept) -> list[str]:
    """The plain backgrounds the concept stands out from (RGB distance >= :data:`MIN_CONTRAST` from its
    median colour), in :data:`BACKGROUNDS` order; at least the two farthest."""
    median = np.array(median_colour(concept.image))
    distance = {name: float(np.linalg.norm(np.array(rgb) - median)) for name, rgb in BACKGROUNDS.items()}
    allowed = [name for name in BACKGROUNDS if distance[name] >= MIN_CONTRAST]
    return allowed if len(allowed) >= 2 else sorted(BACKGROUNDS, key=lambda n: -distance[n])[:2]


def held_out_combination(concept: Concept) -> tuple[str, str]:
    """The (plain background, position) the concept is never shown on / never captioned at in training.

    Chosen by a CRC of the concept's id, so it is the same on every machine and run.
    """
    allowed = allowed_backgrounds(concept)
    code = zlib.crc32(concept.id.encode("ascii"))
    return allowed[code % len(allowed)], POSITIONS[(code // 7) % len(POSITIONS)]


def is_held_out(scene: EmojiScene) -> bool:
    """True when a scene shows its concept on its held-out background (plain or at a gradient's end) or
    states its held-out position."""
    background, position = held_out_combination(scene.concept)
    return background in (scene.background, scene.background_to) or scene.position_word == position


def place(position_word: str | None, extent: int, rng: random.Random) -> tuple[float, float]:
    """Centre (x, y) in pixels: the shapes world's rule for a named position, anywhere on the canvas else."""
    if position_word:
        return shapes.position_centre(position_word, extent, rng)
    half = extent / 2
    low, high = shapes.MARGIN + half, CANVAS - shapes.MARGIN - half
    return rng.uniform(low, high), rng.uniform(low, high)


def sample_scene(rng: random.Random, concepts: list[Concept], *, held_out: bool = False,
                 gradient_rate: float = 0.25) -> EmojiScene:
    """Draw a random scene.

    Args:
        rng: the source of randomness (seed it for reproducible data).
        concepts: what to draw from (uniformly).
        held_out: False draws only training scenes (:func:`is_held_out` False); True draws the held-out
            combination of a random concept: its held-out plain background, named, at its held-out position.
        gradient_rate: the share of training scenes on a two-colour gradient.
    """
    concept = rng.choice(concepts)
    if held_out:
        background, position_word = held_out_combination(concept)
        size_word = rng.choice((None, *SIZES))
        extent = rng.randint(*SIZES[size_word]) if size_word else rng.randint(*UNNAMED_SIZE)
        cx, cy = place(position_word, extent, rng)
        return EmojiScene(concept, background, extent, cx, cy, size_word, position_word, True)
    banned_background, banned_position = held_out_combination(concept)
    allowed = [b for b in allowed_backgrounds(concept) if b != banned_background]
    background = rng.choice(allowed)
    background_to = gradient = None
    if rng.random() < gradient_rate:
        others = [b for b in allowed if b != background]
        if others:
            background_to, gradient = rng.choice(others), rng.choice(GRADIENTS)
    show_background = rng.random() < 0.85
    size_word = rng.choice((None, *SIZES)) if rng.random() < 0.6 else None
    extent = rng.randint(*SIZES[size_word]) if size_word else rng.randint(*UNNAMED_SIZE)
    position_word = None
    if rng.random() < 0.6:
        position_word = rng.choice([p for p in POSITIONS if p != banned_position])
    cx, cy = place(position_word, extent, rng)
    return EmojiScene(concept, background, extent, cx, cy, size_word, position_word, show_background,
                      background_to, gradient)


# ---------------------------------------------------------------------------------------------- captions

def article(noun_phrase: str) -> str:
    """The phrase with "a"/"an" before it, or bare when it reads as a plural ("grapes", "eyes")."""
    last = noun_phrase.split(" with ")[0].split(" of ")[0].split()[-1]  # the head noun: "nest with eggs"
    if last.endswith("s") and not last.endswith(("ss", "us", "is", "os")) and len(last) > 3:
        return noun_phrase
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def subject(concept: Concept, rng: random.Random) -> str:
    """How a caption names the concept: its name (most often), a short name (15%), or a keyword (8%)."""
    shorts = [s for s in concept.short_names if not set(s.split()) & BLOCKED_WORDS]
    keywords = [k for k in concept.keywords if k not in BLOCKED_WORDS]
    roll = rng.random()
    if roll < 0.15 and shorts:
        return rng.choice(shorts)
    if 0.15 <= roll < 0.23 and keywords:
        return rng.choice(keywords)
    return concept.name


def _where(position: str, rng: random.Random) -> str:
    return shapes._position_phrase(position, rng)  # the shapes world's wording of a position


def _parts(scene: EmojiScene, rng: random.Random, thing: str | None = None) -> dict[str, str]:
    thing = thing or subject(scene.concept, rng)
    size = f"{scene.size_word} " if scene.size_word else ""
    return {
        "thing": thing, "size": size, "a_thing": article(size + thing),
        "where": f" {_where(scene.position_word, rng)}" if scene.position_word else "",
        "bg": scene.background_name,
    }


# Training templates: each takes the parts and returns a caption (the background only when it is shown).
TEMPLATES = (
    lambda p, bg: f"{p['a_thing']}{p['where']}" + (f" on {article(p['bg'])} background" if bg else ""),
    lambda p, bg: f"{p['size']}{p['thing']}{p['where']}" + (f", {p['bg']} background" if bg else ""),
    lambda p, bg: (f"{article(p['bg'])} background with {p['a_thing']}{p['where']}" if bg
                   else f"{p['a_thing']}{p['where']}"),
    lambda p, bg: ", ".join(part for part in (p["thing"], p["size"].strip(), p["where"].strip(),
                                              f"{p['bg']} background" if bg else "") if part),
)
# Held-out phrasings: new orders of known words, never produced for training.
HELD_OUT_PHRASINGS = {
    "background first": lambda p: f"on {article(p['bg'])} background, {p['a_thing']}{p['where']}",
    "joined with and": lambda p: f"{article(p['bg'])} background and {p['a_thing']}{p['where']}",
    "object last": lambda p: (f"{p['where'].strip()}, on {p['bg']}, {p['a_thing']}" if p["where"]
                              else f"on {p['bg']}, {p['a_thing']}"),
}


def caption(scene: EmojiScene, rng: random.Random, *, phrasing: str | None = None) -> str:
    """Word a scene.

    Args:
        scene: what to describe.
        rng: picks the template, the name form and the wording of the position.
        phrasing: None for a training caption (one of :data:`TEMPLATES`, now and then without its leading
            article, and for the coloured shapes the shapes world's "a large circle that is orange, on gray");
            a key of :data:`HELD_OUT_PHRASINGS` for an evaluation caption worded as no training caption is,
            naming the concept by its canonical name.

    Returns:
        One lower-case caption.
    """
    if phrasing is not None:  # evaluation: the canonical name, so the prompt says exactly what is asked for
        return HELD_OUT_PHRASINGS[phrasing](_parts(scene, rng, scene.concept.name))
    parts = _parts(scene, rng)
    name = scene.concept.name.split()
    if len(name) == 2 and name[1] in SHAPE_WORDS and name[0] in shapes.BACKGROUNDS and rng.random() < 0.2:
        text = f"{article(parts['size'] + name[1])} that is {name[0]}{parts['where']}"  # the shapes world's form
        text += f", on {parts['bg']}" if scene.show_background else ""
    else:
        text = rng.choice(TEMPLATES)(parts, scene.show_background)
    if text.startswith(("a ", "an ")) and rng.random() < 0.2:
        text = text.split(" ", 1)[1]
    return text


def caption_is_held_out(text: str) -> bool:
    """Whether a caption has a held-out phrasing's shape: it starts with "on ..." or with the position ("in the
    top left corner, on blue, a rocket"), or joins the background with "and"."""
    return text.startswith(("on ", "in the ", "at the ")) or " background and " in text


def render_dataset(count: int, concepts: list[Concept], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Training data in memory: ``count`` scenes drawn by :func:`sample_scene` (no held-out ones), rendered.

    Returns:
        ``(images, captions)``: (count, 64, 64, 3) uint8 RGB and one caption per image.
    """
    rng = random.Random(seed)
    images = np.empty((count, CANVAS, CANVAS, 3), dtype=np.uint8)
    captions = []
    for index in range(count):
        scene = sample_scene(rng, concepts)
        images[index] = render_array(scene)
        captions.append(caption(scene, rng))
    return images, captions


def evaluation_scenes(concepts: list[Concept], per_concept: int = 4, seed: int = 1234) -> list[tuple[EmojiScene, str]]:
    """Scenes and prompts to score a generator on: ``per_concept`` for every concept, each with its
    background, size and position stated, worded with a held-out phrasing (taken in turn). The even ones
    are the concept's held-out combination (:func:`held_out_combination`), the odd ones training
    combinations.

    Returns:
        ``[(scene, prompt), ...]``, concept by concept.
    """
    rng = random.Random(seed)
    phrasings = list(HELD_OUT_PHRASINGS)
    out = []
    for concept in concepts:
        for index in range(per_concept):
            if index % 2 == 0:
                scene = sample_scene(rng, [concept], held_out=True)
            else:
                scene = sample_scene(rng, [concept], gradient_rate=0.0)
            if scene.size_word is None or scene.position_word is None or not scene.show_background:
                size_word = scene.size_word or rng.choice(list(SIZES))
                position_word = scene.position_word or rng.choice(
                    [p for p in POSITIONS if p != held_out_combination(concept)[1]])
                extent = rng.randint(*SIZES[size_word])
                cx, cy = place(position_word, extent, rng)
                scene = EmojiScene(concept, scene.background, extent, cx, cy, size_word, position_word, True,
                                   scene.background_to, scene.gradient)
            out.append((scene, caption(scene, rng, phrasing=phrasings[len(out) % len(phrasings)])))
    return out


def write_folder(out: Path, count: int, concepts: list[Concept], seed: int = 0) -> list[Path]:
    """Write ``count`` training image/caption pairs (``00000.png`` + ``00000.txt``) into ``out``, atomically.

    Returns:
        The image paths written.
    """
    from dallecli.training.dataset import write_example

    rng = random.Random(seed)
    paths = []
    for index in range(count):
        scene = sample_scene(rng, concepts)
        paths.append(write_example(out, f"{index:05d}", render(scene), caption(scene, rng)))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write emoji-world images with captions to a folder.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="emoji sources (emoji_source)")
    parser.add_argument("--selection", choices=sorted(SELECTIONS), default="everyday")
    args = parser.parse_args(argv)
    paths = write_folder(args.out, args.count, load_concepts(args.cache, args.selection), args.seed)
    print(f"wrote {len(paths)} images with captions to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
