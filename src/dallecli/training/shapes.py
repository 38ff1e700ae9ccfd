"""The "shapes" world: a seeded generator of captioned 64x64 images of flat coloured shapes.

It is the training set of the embedded default model and the ground truth that ``dalle eval``
(:mod:`dallecli.training.adherence`) measures generated images against. Scenes are described by
:class:`Scene`; :func:`render` draws one, :func:`caption` words it, :func:`sample_scene` draws a
random one. Some colour-shape pairs are held out of training (:func:`is_held_out`) so that
evaluation can test compositional generalisation.

Usage as fine-tuning data::

    python -m dallecli.training.shapes --out ./shapes-data --count 200
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

CANVAS = 64  # pixels, square
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 220, 35),
    "purple": (140, 45, 185),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    **COLOURS,
}
SIZES = {"small": 16, "large": 36}  # nominal extent in pixels
MEDIUM_RANGE = (21, 30)  # extent in pixels when the caption names no size
POSITIONS = (
    "center", "left", "right", "top", "bottom",
    "top left", "top right", "bottom left", "bottom right",
)
MARGIN = 2  # pixels between a placed shape and the canvas edge

HELD_OUT_PAIRS = frozenset({("purple", "triangle"), ("orange", "square"), ("green", "circle")})
HELD_OUT_BACKGROUND = ("yellow", "blue")  # any yellow object on a blue background


@dataclass(frozen=True)
class Scene:
    """One object on a flat background.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: object colour, a key of :data:`COLOURS`.
        background: a key of :data:`BACKGROUNDS`, never equal to ``colour``.
        extent: width and height of the object's bounding box, pixels (14..38).
        cx, cy: centre of the bounding box, pixels from the top-left corner.
        size_word: "small", "large" or None when the caption does not state the size.
        position_word: one of :data:`POSITIONS` or None when the caption does not state it.
        show_background: whether the caption names the background.
    """

    shape: str
    colour: str
    background: str
    extent: int
    cx: float
    cy: float
    size_word: str | None = None
    position_word: str | None = None
    show_background: bool = True


def is_held_out(colour: str, shape: str, background: str | None) -> bool:
    """True for the colour/shape/background combinations never shown in training."""
    if (colour, shape) in HELD_OUT_PAIRS:
        return True
    return background is not None and (colour, background) == HELD_OUT_BACKGROUND


def position_centre(position: str, extent: int, rng: random.Random) -> tuple[float, float]:
    """Centre (x, y) in pixels for a named position, with up to 2 px of jitter."""
    half = extent / 2
    low, high = MARGIN + half, CANVAS - MARGIN - half
    mid = CANVAS / 2

    def axis(word_low: str, word_high: str) -> float:
        if word_low in position:
            return low + rng.uniform(0, 2)
        if word_high in position:
            return high - rng.uniform(0, 2)
        return mid + rng.uniform(-2, 2)

    return axis("left", "right"), axis("top", "bottom")


def sample_scene(rng: random.Random, *, held_out: bool = False) -> Scene:
    """Draw a random scene.

    Args:
        rng: the source of randomness (seed it for reproducible data).
        held_out: False draws only training combinations; True draws only held-out ones.
    """
    while True:
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLOURS))
        background = rng.choice([b for b in BACKGROUNDS if b != colour])
        show_background = rng.random() < 0.85
        excluded = is_held_out(colour, shape, background)
        if excluded == held_out:
            break
    size_word = rng.choice((None, "small", "large")) if rng.random() < 0.6 else None
    extent = SIZES[size_word] + rng.randint(-2, 2) if size_word else rng.randint(*MEDIUM_RANGE)
    position_word = rng.choice(POSITIONS) if rng.random() < 0.6 else None
    if position_word:
        cx, cy = position_centre(position_word, extent, rng)
    else:
        half = extent / 2
        cx = rng.uniform(MARGIN + half, CANVAS - MARGIN - half)
        cy = rng.uniform(MARGIN + half, CANVAS - MARGIN - half)
    return Scene(shape, colour, background, extent, cx, cy, size_word, position_word, show_background)


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 64x64 RGB image with anti-aliased edges."""
    scale = SUPERSAMPLE
    image = Image.new("RGB", (CANVAS * scale, CANVAS * scale), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    half = scene.extent / 2
    left, top = (scene.cx - half) * scale, (scene.cy - half) * scale
    right, bottom = (scene.cx + half) * scale, (scene.cy + half) * scale
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:  # triangle pointing up, base and height equal to the extent
        draw.polygon(((left, bottom), (right, bottom), ((left + right) / 2, top)), fill=fill)
    return image.reduce(scale)


def _position_phrase(position: str, rng: random.Random) -> str:
    if " " in position:
        return rng.choice((f"in the {position} corner", f"in the {position}"))
    if position == "center":
        return rng.choice(("in the center", "in the middle", "at the center"))
    return rng.choice((f"on the {position}", f"at the {position}"))


def caption(scene: Scene, rng: random.Random) -> str:
    """Word a scene with one of several templates and word orders."""
    size = f"{scene.size_word} " if scene.size_word else ""
    where = f" {_position_phrase(scene.position_word, rng)}" if scene.position_word else ""
    bg = scene.background
    # Now and then leave out the shape or the colour, so each word is learnt on its own.
    roll = rng.random()
    shape = "shape" if roll < 0.05 else scene.shape
    if 0.05 <= roll < 0.1:
        return f"a {size}{shape}{where}" + (f" on a {bg} background" if scene.show_background else "")
    templates = [f"a {size}{scene.colour} {shape}{where}"]
    if scene.show_background:
        templates = [
            f"a {size}{scene.colour} {shape}{where} on a {bg} background",
            f"{size}{scene.colour} {shape}{where}, {bg} background",
            f"a {bg} background with a {size}{scene.colour} {shape}{where}",
            f"a {size}{shape} that is {scene.colour}{where}, on {bg}",
        ]
    text = rng.choice(templates)
    return text[2:] if text.startswith("a ") and rng.random() < 0.2 else text


def write_folder(out: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` image/caption pairs (``0000.png`` + ``0000.txt``) into ``out``, atomically.

    Returns:
        The image paths written.
    """
    from dallecli.training.dataset import write_example

    rng = random.Random(seed)
    paths = []
    for index in range(count):
        scene = sample_scene(rng)
        paths.append(write_example(out, f"{index:04d}", render(scene), caption(scene, rng)))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write shapes-world images with captions to a folder.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_folder(args.out, args.count, args.seed)


if __name__ == "__main__":
    main()
