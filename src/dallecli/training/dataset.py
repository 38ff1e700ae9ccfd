"""A folder of the user's images and captions, checked before any training step, and loaded correctly.

Caption sources, looked up for every image in this order (the first one that gives a non-empty text wins):

1. ``metadata.jsonl`` in the folder (Hugging Face ``imagefolder``: one ``{"file_name": ..., "text": ...}`` per
   line; ``caption`` is accepted instead of ``text``);
2. ``metadata.csv`` with a header row holding ``file_name`` and ``text`` (or ``caption``);
3. a caption file with the image's stem: ``a.png`` + ``a.txt`` (or ``a.caption``);
4. the default caption (``--caption``, a DreamBooth-style instance prompt).

``--caption-prefix`` is put in front of every caption (``"sks cat, " + caption``).

:func:`scan_folder` looks at every file first and says what it skips and why (folder metadata such as
``.DS_Store``/``Thumbs.db``, notes, zero-byte or corrupt images); :func:`check_captions` stops the run when
images lack captions. :func:`load_rgb` (from :mod:`dallecli.engine.inputs`, shared with ``dalle edit`` and
``--image``) turns any Pillow image into 8-bit RGB: EXIF orientation applied, transparency composited on white,
grayscale/palette/CMYK converted, 16-bit samples scaled (not clipped).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from dallecli.errors import DatasetError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIXES = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_KNOWN_JUNK = {
    ".ds_store": "macOS folder metadata",
    "thumbs.db": "Windows thumbnail cache",
    "desktop.ini": "Windows folder settings",
}


@dataclass(frozen=True)
class Example:
    """One training image: its path, its caption (None when none was found) and where the caption came from
    ("metadata.jsonl", "metadata.csv", ".txt", ".caption", "--caption" or None)."""

    path: Path
    caption: str | None
    source: str | None


@dataclass(frozen=True)
class Skipped:
    """A file that will not be trained on, relative to the data folder, and why."""

    path: str
    reason: str


@dataclass
class FolderScan:
    """What :func:`scan_folder` found: usable images (sorted by path) and skipped files."""

    folder: Path
    examples: list[Example] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def captioned(self) -> int:
        return sum(1 for e in self.examples if e.caption)

    @property
    def uncaptioned(self) -> list[Example]:
        return [e for e in self.examples if not e.caption]

    def summary(self) -> str:
        """``"5/6 images captioned"``."""
        return f"{self.captioned}/{len(self.examples)} images captioned"


def write_example(folder: Path, name: str, image, caption: str) -> Path:
    """Write one training pair the way :func:`scan_folder` reads it, ``name.png`` and ``name.txt`` (the caption),
    each atomically. ``image`` is a PIL image. Returns the PNG's path."""
    import io

    from dallecli.atomic import write_file

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = write_file(Path(folder) / f"{name}.png", buffer.getvalue())
    write_file(path.with_suffix(".txt"), caption + "\n")
    return path


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8-sig", errors="replace").strip()


def _metadata_captions(folder: Path, skipped: list[Skipped]) -> dict[str, tuple[str, str]]:
    """``{relative file name: (caption, source)}`` from metadata.jsonl / metadata.csv (jsonl first)."""
    found: dict[str, tuple[str, str]] = {}
    jsonl = folder / "metadata.jsonl"
    if jsonl.is_file():
        for number, line in enumerate(_read_text(jsonl).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row.get("text", row.get("caption"))
            except (ValueError, KeyError, TypeError, AttributeError):
                skipped.append(Skipped(f"metadata.jsonl line {number}", "not a JSON object with file_name and text"))
                continue
            if isinstance(text, str) and text.strip():
                found.setdefault(Path(name).as_posix(), (text.strip(), "metadata.jsonl"))
    table = folder / "metadata.csv"
    if table.is_file():
        with table.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            column = "text" if reader.fieldnames and "text" in reader.fieldnames else "caption"
            if not reader.fieldnames or "file_name" not in reader.fieldnames or column not in reader.fieldnames:
                skipped.append(Skipped("metadata.csv", "needs a header row with file_name and text columns"))
            else:
                for row in reader:
                    text = (row.get(column) or "").strip()
                    if row.get("file_name") and text:
                        found.setdefault(Path(row["file_name"]).as_posix(), (text, "metadata.csv"))
    return found


def _check_image(path: Path) -> str | None:
    """Why ``path`` cannot be trained on (None when it decodes fully)."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as image:
            image.load()  # decodes everything: catches truncated files that verify() lets through
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"corrupt or unreadable image ({first_line(exc)})"
    return None


def scan_folder(folder: Path, caption: str | None = None, caption_prefix: str | None = None) -> FolderScan:
    """Look at every file under ``folder`` (recursively, hidden folders excluded) before training.

    Args:
        folder: the data folder.
        caption: default caption for images without one (``--caption``).
        caption_prefix: text put in front of every caption, joined with ", " (``--caption-prefix``).

    Returns:
        A :class:`FolderScan`; images without any caption have ``caption=None``.

    Raises:
        DatasetError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder; give the folder that holds your training images")
    skipped: list[Skipped] = []
    metadata = _metadata_captions(folder, skipped)
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    image_stems = {p.with_suffix("") for p in images}
    scan = FolderScan(folder)
    for path in files:
        rel = path.relative_to(folder).as_posix()
        lower = path.name.lower()
        if path.suffix.lower() in IMAGE_SUFFIXES:
            problem = _check_image(path)
            if problem:
                skipped.append(Skipped(rel, problem))
                continue
            text, source = metadata.get(rel, (None, None))
            for suffix in CAPTION_SUFFIXES:
                side = path.with_suffix(suffix)
                if text is None and side.is_file() and _read_text(side):
                    text, source = _read_text(side), suffix
            if text is None and caption and caption.strip():
                text, source = caption.strip(), "--caption"
            if text is not None and caption_prefix and caption_prefix.strip():
                text = f"{caption_prefix.strip()}, {text}"
            scan.examples.append(Example(path, text, source))
        elif lower in METADATA_FILES and path.parent == folder:
            continue
        elif path.suffix.lower() in CAPTION_SUFFIXES and path.with_suffix("") in image_stems:
            continue
        elif lower in _KNOWN_JUNK:
            skipped.append(Skipped(rel, _KNOWN_JUNK[lower]))
        elif lower.startswith("._"):
            skipped.append(Skipped(rel, "macOS resource fork"))
        elif path.suffix.lower() in CAPTION_SUFFIXES:
            skipped.append(Skipped(rel, "text file with no image of the same name (notes?)"))
        else:
            skipped.append(Skipped(rel, f"not an image ({path.suffix or 'no extension'})"))
    scan.skipped = skipped
    return scan


def check_captions(scan: FolderScan, allow_missing: bool = False) -> None:
    """Stop before training when there is nothing to train on or when captions are missing.

    Raises:
        DatasetError: no usable image; or some images have no caption and ``allow_missing`` is False (the
            message gives "N/M images captioned", names the first few, and the three ways out).
    """
    if not scan.examples:
        raise DatasetError(f"no usable images in {scan.folder} ({len(scan.skipped)} file(s) skipped); "
                           f"supported: {', '.join(IMAGE_SUFFIXES)}")
    missing = scan.uncaptioned
    if missing and not allow_missing:
        names = ", ".join(e.path.relative_to(scan.folder).as_posix() for e in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(
            f"{scan.summary()}; no caption for {names}{more}. Add a .txt beside each image (or metadata.jsonl), "
            "give --caption TEXT for the rest, or --allow-missing-captions to train them uncaptioned"
        )


def resize_and_crop(image, resolution: int, center_crop: bool = True, rng: random.Random | None = None):
    """Scale ``image`` so its shorter side is ``resolution`` pixels (Lanczos), then crop a square of
    ``resolution`` x ``resolution`` from the centre, or at a random place drawn from ``rng``."""
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    extra_x, extra_y = size[0] - resolution, size[1] - resolution
    if center_crop or rng is None:
        left, top = extra_x // 2, extra_y // 2
    else:
        left, top = rng.randint(0, extra_x), rng.randint(0, extra_y)
    return image.crop((left, top, left + resolution, top + resolution))


def image_tensor(image):
    """8-bit RGB PIL image -> (3, H, W) float32 tensor in [-1, 1] (the VAE's input range)."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
