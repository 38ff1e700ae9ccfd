"""A contact sheet: many images as thumbnails on one PNG."""

from __future__ import annotations

import math
from pathlib import Path

from dallecli.atomic import write_file


def contact_sheet(paths: list[Path], out: Path, *, cell: int = 256, max_side: int = 8192) -> Path:
    """Write the images in ``paths`` as a grid of thumbnails, row-major, to ``out`` (PNG).

    The sheet is about square (ceil(sqrt(count)) columns); each cell is ``cell`` pixels, made smaller so that the
    sheet stays within ``max_side`` pixels a side; images are scaled to fit their cell, keeping their aspect
    ratio, on a white background.
    ``out`` is written to a temporary file and renamed into place (a sheet from an earlier run is replaced).

    Args:
        paths: image files (unreadable ones are left out).
        out: the PNG to write.
        cell: thumbnail size in pixels.
        max_side: the largest width or height of the sheet in pixels.

    Returns:
        ``out``.

    Raises:
        ValueError: no paths.
        DiskFullError: no space left (or quota exceeded); nothing is left.
        OSError: ``out`` cannot be written.
    """
    from PIL import Image, ImageOps

    if not paths:
        raise ValueError("a contact sheet needs at least one image")
    columns = math.ceil(math.sqrt(len(paths)))
    rows = math.ceil(len(paths) / columns)
    cell = max(8, min(cell, max_side // max(columns, rows)))
    sheet = Image.new("RGB", (columns * cell, rows * cell), "white")
    for index, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                thumb = ImageOps.contain(image.convert("RGB"), (cell, cell))
        except OSError:
            continue
        x, y = (index % columns) * cell, (index // columns) * cell
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
    return write_file(Path(out), lambda handle: sheet.save(handle, format="PNG"), what=f"the contact sheet {out}")
