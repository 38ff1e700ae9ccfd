"""A contact sheet: many images as thumbnails on one image (PNG, JPEG or WebP), optionally labelled."""

from __future__ import annotations

import math
from pathlib import Path

from dallecli.atomic import write_file

LABELS = ("none", "prompt", "seed")  # --grid-label
CELL, MAX_SIDE = 256, 8192  # thumbnail side and the sheet's largest side, in pixels


def grid_layout(count: int, *, cell: int = CELL, max_side: int = MAX_SIDE, labelled: bool = False
                ) -> tuple[int, int, int, int]:
    """Where ``count`` thumbnails go: about square (ceil(sqrt(count)) columns), each cell ``cell`` pixels made
    smaller so that the sheet stays within ``max_side`` a side (never under 8 pixels, so a sheet of more than a
    million images can be larger), plus a label band under each cell when ``labelled``.

    Returns:
        ``(columns, rows, cell, band)``: the sheet is ``columns * cell`` wide and ``rows * (cell + band)`` high.
    """
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    cell = max(8, min(cell, max_side // max(columns, rows)))
    band = max(12, cell // 10) if labelled else 0
    if labelled and rows * (cell + band) > max_side:
        cell = max(8, min(cell, max_side // rows - band))
    return columns, rows, cell, band


def grid_size(count: int, *, labelled: bool = False) -> tuple[int, int]:
    """The (width, height) in pixels of the sheet :func:`contact_sheet` makes of ``count`` images."""
    columns, rows, cell, band = grid_layout(count, labelled=labelled)
    return columns * cell, rows * (cell + band)


def contact_sheet(paths: list[Path], out: Path, *, cell: int = CELL, max_side: int = MAX_SIDE,
                  labels: list[str] | None = None, fmt=None) -> Path:
    """Write the images in ``paths`` as a grid of thumbnails, row-major, to ``out``.

    The layout is :func:`grid_layout`'s; images are scaled to fit their cell, keeping their aspect ratio, on a
    white background; each label is drawn under its cell, cut with "..." to the cell's width.
    ``out`` is written to a temporary file and renamed into place (a sheet from an earlier run is replaced).

    Args:
        paths: image files (unreadable ones leave their cell empty).
        out: the file to write (its suffix should be the format's).
        cell: thumbnail size in pixels.
        max_side: the largest width or height of the sheet in pixels.
        labels: one text per path (the prompt, or the seed), or None for no labels.
        fmt: a :class:`dallecli.images.OutputFormat`; default PNG.

    Returns:
        ``out``.

    Raises:
        ValueError: no paths, or not one label per path.
        DiskFullError: no space left (or quota exceeded); nothing is left.
        OSError: ``out`` cannot be written.
    """
    from PIL import Image, ImageDraw, ImageOps

    from dallecli.images import PNG, save_image

    if not paths:
        raise ValueError("a contact sheet needs at least one image")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} images")
    columns, rows, cell, band = grid_layout(len(paths), cell=cell, max_side=max_side, labelled=labels is not None)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + band)), "white")
    draw, font = (ImageDraw.Draw(sheet), _font(band)) if labels is not None else (None, None)
    for index, path in enumerate(paths):
        x, y = (index % columns) * cell, (index // columns) * (cell + band)
        try:
            with Image.open(path) as image:
                thumb = ImageOps.contain(image.convert("RGB"), (cell, cell))
        except OSError:
            thumb = None
        if thumb is not None:
            sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        if draw is not None:
            text = _fit(draw, font, labels[index], cell - 4)
            draw.text((x + 2, y + cell + band // 2), text, fill="black", font=font, anchor="lm")
    fmt = fmt or PNG
    return write_file(Path(out), lambda handle: save_image(sheet, handle, fmt), what=f"the contact sheet {out}")


def _font(band: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(8, band - 4))
    except (OSError, TypeError, ValueError):  # no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, font, text: str, width: int) -> str:
    """``text`` on one line (control characters as spaces), cut with "..." to ``width`` pixels."""
    text = "".join(" " if ch < " " or "\x7f" <= ch <= "\x9f" else ch for ch in text).strip()
    if draw.textlength(text, font=font) <= width:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest cut that fits, by bisection
        middle = (low + high + 1) // 2
        if draw.textlength(text[:middle] + "...", font=font) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "..." if low else ""


def job_label(job, label: str) -> str | None:
    """A batch job's label for ``--grid-label`` (``label`` one of :data:`LABELS`): its prompt, "seed N", or None."""
    return {"prompt": job.prompt, "seed": f"seed {job.seed}"}.get(label)


def write_run_grids(folder: Path, jobs: list, all_jobs: list, finished: dict, *, shard=None, fmt=None,
                    label: str = "none") -> list[Path]:
    """The contact sheets of a ``dalle batch --grid`` run: ``grid<suffix>`` of its finished images, or for a shard
    ``grid-I-of-N<suffix>``, and then also the combined ``grid<suffix>`` of every shard once every image of
    the whole file is finished (whichever shard ends last writes it).

    Args:
        folder: the output folder.
        jobs: this run's jobs, in file order.
        all_jobs: every job of the file (all shards); the same as ``jobs`` without a shard.
        finished: job key -> finished files (:func:`dallecli.batch.manifest.finished_images`), in ``fmt`` only.
        shard: the :class:`~dallecli.batch.plan.Shard`, or None.
        fmt: a :class:`dallecli.images.OutputFormat`; default PNG.
        label: one of :data:`LABELS`.

    Returns:
        The sheets written (none when no image is finished).

    Raises:
        DiskFullError, OSError: a sheet cannot be written.
    """
    from dallecli.images import PNG

    fmt = fmt or PNG
    written = []
    sheets = [(f"grid-{shard.index}-of-{shard.count}" if shard else "grid", jobs, False)]
    if shard is not None:
        sheets.append(("grid", all_jobs, True))
    for name, chosen, needs_all in sheets:
        done = [job for job in chosen if job.key() in finished]
        if not done or (needs_all and len(done) < len(chosen)):
            continue
        labels = None if label == "none" else [job_label(job, label) for job in done]
        written.append(contact_sheet([finished[job.key()][-1] for job in done], Path(folder) / f"{name}{fmt.suffix}",
                                     labels=labels, fmt=fmt))
    return written
