"""Image files: safe unique names, atomic no-overwrite PNG writes with generation metadata, and reading it back.

Each PNG carries two text chunks: ``parameters`` in the AUTOMATIC1111 format (read by most image tools) and
``dalle``, a JSON document with every setting needed to reproduce the image (``dalle generate --from``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path

from dallecli.atomic import place, staged_file
from dallecli.errors import UsageError

MAX_NAME_BYTES = 100
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]')
_SEPARATORS = re.compile(r"[\s\-_.,;!'`~()\[\]{}@#$%^&+=]+")
_NUMBERED = re.compile(r"^(\d{4,})-")


def prepare_output_folder(folder: Path, option: str = "--out") -> Path:
    """Check, before any model loads, that ``folder`` is or can become a writable folder. Nothing is left
    created, and ``folder`` itself is never touched: a private probe folder is made and removed in its nearest
    existing parent (which catches file systems that refuse mkdir), so processes started together on the same
    new folder cannot remove it under one another. An existing folder gets a private probe file, made and
    removed: the access check trusts permission bits, which root passes, and some file systems (``/sys``, a
    read-only or root-squashed mount) pass it and refuse the write.

    Raises:
        UsageError: it is a file, its nearest existing parent is a file or not writable, or it cannot be created
            or written.
    """
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {folder} is a file, not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {folder} is not writable")
    if not folder.exists():  # some file systems (/proc, /sys) pass the access check and refuse mkdir
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".dalle-probe-", dir=existing))
        except OSError as exc:
            raise UsageError(f"{option} {folder} cannot be created: {exc.strerror or exc}") from None
    else:  # ... and refuse new files in a folder that exists
        try:
            fd, probe = tempfile.mkstemp(prefix=".dalle-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UsageError(f"{option} {folder} is not writable: {exc.strerror or exc}") from None
    return folder


def slugify(text: str, max_bytes: int = 60) -> str:
    """A file-name-safe form of ``text``: NFC, lower case, letters and digits of any script joined by '-',
    cut at a character boundary to at most ``max_bytes`` UTF-8 bytes; "image" when nothing is left."""
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())  # lower() can denormalize
    text = _UNSAFE.sub(" ", text)
    kept = "".join(ch if (ch.isalnum() or ch.isspace() or ch in "-_") else " " for ch in text)
    slug = _SEPARATORS.sub("-", kept).strip("-")
    limit = max(0, max_bytes)
    while True:  # cutting can split a base character from its marks: normalize again, then re-check the size
        cut = slug.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
        cut = unicodedata.normalize("NFC", cut).strip("-")
        if len(cut.encode("utf-8")) <= max(0, max_bytes):
            break
        limit -= 1
    return cut or "image"


def next_index(folder: Path) -> int:
    """One more than the highest ``NNNN-`` prefix of the files in ``folder`` (0 for an empty folder)."""
    highest = -1
    if folder.is_dir():
        for entry in folder.iterdir():
            match = _NUMBERED.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
    return highest + 1


def image_name(index: int, seed: int, prompt: str, suffix: str = ".png", copy: int = 1) -> str:
    """``0007-1234-a-red-circle.png``: at most 100 bytes, no path separators or reserved characters.

    ``copy`` n >= 2 names the n-th image with the same number, seed and prompt ``0007-1234-a-red-circle.2.png``
    (a slug never holds a dot, so the tag cannot be mistaken for part of the prompt)."""
    head = f"{index:04d}-{seed}-"
    suffix = f".{copy}{suffix}" if copy > 1 else suffix
    room = MAX_NAME_BYTES - len(head.encode()) - len(suffix)
    return head + slugify(prompt, max_bytes=min(60, room)) + suffix


def a1111_parameters(settings: dict, sampler: str) -> str:
    """The AUTOMATIC1111 ``parameters`` text for a settings dict."""
    lines = [settings["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = [
        f"Steps: {settings['steps']}", f"Sampler: {sampler}", f"CFG scale: {settings['guidance_scale']:g}",
        f"Seed: {settings['seed']}", f"Size: {settings['width']}x{settings['height']}", f"Model: {settings['model']}",
    ]
    if settings.get("clip_skip") and settings["clip_skip"] > 1:
        fields.append(f"Clip skip: {settings['clip_skip']}")
    if settings.get("strength") is not None:  # an img2img or inpainting image, as A1111 writes it
        fields.append(f"Denoising strength: {settings['strength']:g}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _atomic_link(tmp: Path, folder: Path, make_name, start: int) -> Path:
    """Give ``tmp`` its final name without ever replacing a file; tries the next index on a clash."""
    index = start
    for _ in range(10_000):
        final = folder / make_name(index)
        try:
            place(tmp, final, overwrite=False)  # no overwrite, even against other processes
            return final
        except FileExistsError:
            index += 1
    raise UsageError(f"could not find a free file name in {folder}")


def write_png(image, folder: Path, settings: dict, sampler: str, index: int | None = None, *,
              keep_index: bool = False) -> Path:
    """Write ``image`` as a PNG with both metadata chunks, atomically, never overwriting a file.

    The image goes to a temporary file in ``folder`` and is hard-linked to its final name, so a reader or
    an interruption never sees a half-written PNG, and a name taken meanwhile (another process) is skipped.

    Args:
        image: a PIL image.
        folder: the output folder (created).
        settings: an :class:`~dallecli.engine.request.ImageSettings` dict (prompt, seed, steps, ...).
        sampler: the AUTOMATIC1111 sampler name for the ``parameters`` chunk.
        index: the number to start from; default: one more than the highest in ``folder``.
        keep_index: on a name clash keep ``index`` and tag the name ``.2``, ``.3``, ... (:func:`image_name`)
            instead of moving on to the next number: ``dalle batch`` names an image by its row, and the next
            number is the next row's.

    Returns:
        The path written, directly inside ``folder``.

    Raises:
        DiskFullError: no space left (or quota exceeded); the temporary file is removed, nothing is left.
        UsageError: no free file name in ``folder``.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(settings, sampler))
    info.add_text("dalle", json.dumps(settings, ensure_ascii=False))
    return _place(lambda handle: image.save(handle, format="PNG", pnginfo=info), folder, settings, index,
                  keep_index)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_png_bytes(data: bytes, folder: Path, settings: dict, index: int | None = None) -> Path:
    """Write a PNG file's bytes as they are (they already carry their metadata chunks: an image made by
    ``dalle serve`` for ``dalle generate --server``) under the name :func:`write_png` gives ``settings``,
    atomically, never overwriting a file.

    Args:
        data: the bytes of a PNG file.
        folder: the output folder (created).
        settings: the image's settings dict (its ``seed`` and ``prompt`` make the name).
        index: the number to start from; default: one more than the highest in ``folder``.

    Returns:
        The path written, directly inside ``folder``.

    Raises:
        UsageError: ``data`` is not a PNG file, or no free file name in ``folder``.
        DiskFullError: no space left (or quota exceeded); nothing is left.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise UsageError("the image received is not a PNG file")
    return _place(lambda handle: handle.write(data), folder, settings, index)


def _place(fill, folder: Path, settings: dict, index: int | None, keep_index: bool = False) -> Path:
    """Write a temporary file in ``folder`` with ``fill(handle)`` and link it to its final name (see
    :func:`write_png`)."""
    with staged_file(folder, ".png", what=f"an image in {folder}",
                     advice="Free some space or choose another --out folder") as tmp:
        with open(tmp, "wb") as handle:
            fill(handle)
        if keep_index and index is not None:  # the number stays; a clash takes a copy tag (copy 1: no tag)
            return _atomic_link(tmp, folder, lambda copy: image_name(index, settings["seed"], settings["prompt"],
                                                                     copy=copy), 1)
        start = next_index(folder) if index is None else index
        return _atomic_link(tmp, folder, lambda i: image_name(i, settings["seed"], settings["prompt"]), start)


def parse_a1111(text: str) -> dict:
    """Parse an AUTOMATIC1111 ``parameters`` chunk into our settings keys (what it holds of them)."""
    lines = text.strip().split("\n")
    fields_line = lines[-1] if len(lines) > 1 and "Steps:" in lines[-1] else ""
    body = lines[:-1] if fields_line else lines
    prompt_lines, negative = [], None
    for line in body:
        if line.startswith("Negative prompt:"):
            negative = line[len("Negative prompt:"):].strip()
        elif negative is None:
            prompt_lines.append(line)
        else:
            negative += "\n" + line
    result: dict = {"prompt": "\n".join(prompt_lines).strip(), "negative_prompt": negative}
    fields = dict(re.findall(r"\s*([\w ]+):\s*([^,]+)", fields_line))
    converters = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
                  "Sampler": ("sampler", str), "Model": ("model", str), "Clip skip": ("clip_skip", int),
                  "Denoising strength": ("strength", float)}
    for key, (name, convert) in converters.items():
        if key in fields:
            try:
                result[name] = convert(fields[key].strip())
            except ValueError:
                pass
    if "Size" in fields and "x" in fields["Size"]:
        width, _, height = fields["Size"].strip().partition("x")
        if width.isdigit() and height.isdigit():
            result["width"], result["height"] = int(width), int(height)
    return result


# The type of each setting that ``--from`` feeds back into a request; a file from anyone may hold anything.
_SETTING_TYPES = {"prompt": str, "negative_prompt": str, "model": str, "model_revision": str, "scheduler": str,
                  "sampler": str, "dtype": str, "vae": str, "seed": int, "steps": int, "width": int, "height": int,
                  "clip_skip": int, "guidance_scale": (int, float), "loras": list, "task": str,
                  "strength": (int, float), "init_image": dict, "mask": dict}


def _checked_settings(stored, path: Path) -> dict:
    """``stored`` if it is a JSON object whose known settings have their types (None allowed).

    Raises:
        UsageError: not an object, or a setting of the wrong type (named, with its value shortened).
    """
    if not isinstance(stored, dict):
        raise UsageError(f"{path} has a damaged dalle metadata chunk (a JSON {type(stored).__name__}, not an object)")
    for key, expected in _SETTING_TYPES.items():
        value = stored.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            shown = json.dumps(value, ensure_ascii=False)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise UsageError(f"{path} has a damaged dalle metadata chunk: {key} is {shown}")
    if any(not isinstance(entry, dict) for entry in stored.get("loras") or []):
        raise UsageError(f"{path} has a damaged dalle metadata chunk: loras holds a non-object")
    return stored


def read_metadata(path: Path) -> dict:
    """The generation settings stored in an image: our ``dalle`` chunk, else a parsed ``parameters`` chunk.

    Returns:
        A dict with a ``source`` key ("dalle" or "a1111") and the settings found.

    Raises:
        UsageError: the file is not a readable image or carries no generation parameters.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or image.info)
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"{path} is not a readable image ({exc})") from exc
    if "dalle" in text:
        try:
            stored = json.loads(text["dalle"])
        except ValueError as exc:
            raise UsageError(f"{path} has a damaged dalle metadata chunk") from exc
        return {"source": "dalle", **_checked_settings(stored, path)}
    if "parameters" in text:
        return {"source": "a1111", **parse_a1111(str(text["parameters"]))}
    raise UsageError(f"{path} carries no generation parameters")


def stored_prompt(image) -> tuple[str | None, str | None]:
    """(prompt, negative prompt) from an image's own metadata (dalle's or AUTOMATIC1111's), or (None, None) when
    it carries none; ``image`` is a path or a binary file object (an upload). An unreadable file is left to the
    engine to report."""
    try:
        stored = read_metadata(image)
    except UsageError:
        return None, None
    prompt = stored.get("prompt")
    return (prompt if isinstance(prompt, str) and prompt.strip() else None), stored.get("negative_prompt") or None
