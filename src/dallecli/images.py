"""Image files: safe unique names, atomic no-overwrite writes (PNG, JPEG, WebP) with generation metadata, and
reading it back.

Each PNG carries two text chunks: ``parameters`` in the AUTOMATIC1111 format (read by most image tools) and
``dalle``, a JSON document with every setting needed to reproduce the image (``dalle generate --from``).
A JPEG or WebP carries the same two: the ``parameters`` text in the EXIF UserComment (tag 0x9286 of the Exif IFD,
``UNICODE\\0`` then UTF-16 big-endian, as AUTOMATIC1111 writes it through piexif), and the ``dalle`` JSON in XMP,
as the text of a ``dalle:settings`` element (namespace :data:`XMP_NAMESPACE`; the JSON is ASCII, XML-escaped).
Reading also understands ComfyUI's PNG chunks (``prompt``, ``workflow``).
"""

from __future__ import annotations

import html
import json
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from dallecli.atomic import place, staged_file
from dallecli.errors import UsageError

MAX_NAME_BYTES = 100
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]')
_SEPARATORS = re.compile(r"[\s\-_.,;!'`~()\[\]{}@#$%^&+=]+")
_NUMBERED = re.compile(r"^(\d{4,})-")

FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}  # --format -> file suffix
MAX_SIDE = {"png": 2**31 - 1, "jpeg": 65_535, "webp": 16_383}  # the largest width or height each format holds
DEFAULT_QUALITY = 90  # JPEG and WebP, when --quality is not given
JPEG_SEGMENT = 65_533  # bytes in one JPEG APP1 segment: the EXIF block, and the XMP packet, each fit in one
METADATA_MARGIN = 8_192  # room kept in a JPEG segment for the settings other than the prompts (paths, LoRAs)
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
XMP_NAMESPACE = "https://github.com/dallecli/dallecli/ns/xmp/1.0/"
_XMP_SETTINGS = re.compile(rb"<dalle:settings>([^<]*)</dalle:settings>")


@dataclass(frozen=True)
class OutputFormat:
    """How images are written: ``name`` one of :data:`FORMATS`; ``quality`` 1-100 for JPEG and WebP (None:
    :data:`DEFAULT_QUALITY`; always None for PNG)."""

    name: str = "png"
    quality: int | None = None

    @property
    def suffix(self) -> str:
        """The file suffix (".png", ".jpg", ".webp")."""
        return FORMATS[self.name]


PNG = OutputFormat()


def output_format(name: str | None, quality: int | None = None) -> OutputFormat:
    """Check ``--format`` and ``--quality`` (before anything loads).

    Args:
        name: "png", "jpeg" (or "jpg") or "webp", any case; None for PNG.
        quality: 1-100, JPEG and WebP only; None for the default.

    Returns:
        The :class:`OutputFormat`.

    Raises:
        UsageError: an unknown format, a quality out of range, or a quality for PNG (lossless).
    """
    key = (name or "png").strip().lower()
    key = "jpeg" if key == "jpg" else key
    if key not in FORMATS:
        raise UsageError(f"--format {name!r} is not one of png, jpeg, webp")
    if quality is not None:
        if key == "png":
            raise UsageError("--quality is for --format jpeg or webp (PNG is lossless)")
        if not 1 <= quality <= 100:
            raise UsageError(f"--quality must be between 1 and 100 (got {quality})")
    return OutputFormat(key, quality)


def check_image_size(fmt: OutputFormat, width: int, height: int, what: str = "the image") -> None:
    """Refuse, before anything is generated, a size that ``fmt`` cannot hold (WebP: 16,383 pixels a side;
    JPEG: 65,535).

    Args:
        fmt: the output format.
        width, height: the size in pixels.
        what: what would be written, for the message ("the grid").

    Raises:
        UsageError: a side over :data:`MAX_SIDE` of the format.
    """
    limit = MAX_SIDE[fmt.name]
    if max(width, height) > limit:
        raise UsageError(f"{what} would be {width}x{height} pixels and {fmt.name.upper()} holds at most {limit:,} "
                         f"pixels a side; choose --format png or a smaller size")


def check_metadata_room(fmt: OutputFormat, prompt: str | None, negative_prompt: str | None = None,
                        what: str = "the prompt") -> None:
    """Refuse, before anything is generated, prompts too long for a JPEG's metadata (one 64 KB segment for the
    EXIF parameters, one for the XMP settings); PNG and WebP have room for any prompt.

    Raises:
        UsageError: ``fmt`` is JPEG and the prompts do not fit.
    """
    if fmt.name != "jpeg":
        return
    texts = {"prompt": prompt or "", "negative_prompt": negative_prompt}
    need = max(len(_xmp_packet(texts)), len(user_comment(f"{prompt or ''}\n{A1111_NEGATIVE} {negative_prompt or ''}")))
    if need + METADATA_MARGIN > JPEG_SEGMENT:
        raise UsageError(f"{what} is too long for a JPEG's metadata ({need:,} bytes; a JPEG metadata segment holds "
                         f"{JPEG_SEGMENT - METADATA_MARGIN:,} for the prompts); choose --format png or webp")


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


# AUTOMATIC1111's ``parameters`` text: the prompt, then ``Negative prompt: ...``, then one line of ``Label: value``
# fields. One table for the writer (:func:`a1111_parameters`, in this order) and the reader (:func:`parse_a1111`):
# label, our settings key, the value's type. "Sampler" is the A1111 name given to the writer; "Size" is
# ``WIDTHxHEIGHT``; the optional ones are left out when they do not apply.
A1111_NEGATIVE = "Negative prompt:"
A1111_FIELDS: tuple[tuple[str, str, type], ...] = (
    ("Steps", "steps", int), ("Sampler", "sampler", str), ("CFG scale", "guidance_scale", float),
    ("Seed", "seed", int), ("Size", "size", str), ("Model", "model", str), ("Clip skip", "clip_skip", int),
    ("Denoising strength", "strength", float),
)
_A1111_OPTIONAL = {"clip_skip": lambda v: v is not None and v > 1,  # A1111's 1 skips nothing: not written
                   "strength": lambda v: v is not None}  # an img2img or inpainting image, as A1111 writes it


def a1111_parameters(settings: dict, sampler: str) -> str:
    """The AUTOMATIC1111 ``parameters`` text for a settings dict (the fields of :data:`A1111_FIELDS`)."""
    lines = [settings["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"{A1111_NEGATIVE} {settings['negative_prompt']}")
    values = {**settings, "sampler": sampler, "size": f"{settings['width']}x{settings['height']}"}
    fields = []
    for label, key, kind in A1111_FIELDS:
        value = values.get(key)
        if key in _A1111_OPTIONAL and not _A1111_OPTIONAL[key](value):
            continue
        fields.append(f"{label}: {value:g}" if kind is float else f"{label}: {value}")
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


def user_comment(text: str) -> bytes:
    """An EXIF UserComment holding ``text`` as AUTOMATIC1111 writes it (piexif's ``UserComment.dump(text,
    encoding="unicode")``): ``UNICODE\\0`` then UTF-16 big-endian."""
    return b"UNICODE\0" + text.encode("utf-16-be", errors="surrogatepass")


def read_user_comment(raw) -> str | None:
    """The text of an EXIF UserComment (any of its character codes), or None when it holds none.

    ``UNICODE\\0`` is UTF-16: big-endian as the EXIF standard and piexif write it, little-endian as some tools do
    (told apart by a byte-order mark, else by where the zero bytes of ASCII text fall); ``ASCII``, ``JIS`` and
    an undefined code are read as UTF-8. Undecodable bytes are replaced, never raised.
    """
    if isinstance(raw, str):
        return raw.rstrip("\0") or None
    if not isinstance(raw, (bytes, bytearray)):
        return None
    raw = bytes(raw)
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            encoding = "utf-16"
        else:
            encoding = "utf-16-be" if body[0::2].count(0) >= body[1::2].count(0) else "utf-16-le"
        text = body[: len(body) // 2 * 2].decode(encoding, errors="replace")
    elif head in (b"ASCII\0\0\0", b"JIS\0\0\0\0\0", b"\0" * 8):
        text = body.decode("utf-8", errors="replace")
    else:
        text = raw.decode("utf-8", errors="replace")
    return text.rstrip("\0") or None


def _xmp_packet(settings: dict) -> bytes:
    """An XMP packet with the ``dalle`` JSON as the text of a ``dalle:settings`` element."""
    body = html.escape(json.dumps(settings, ensure_ascii=True), quote=False)
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:dalle="{XMP_NAMESPACE}"><dalle:settings>{body}</dalle:settings>'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


def read_xmp_settings(xmp) -> str | None:
    """The ``dalle`` JSON text in an XMP packet written by :func:`write_image`, or None (no regular expression
    or XML parser runs on more than the packet's bytes; entities are not expanded beyond XML's five)."""
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", errors="replace")
    if not isinstance(xmp, (bytes, bytearray)):
        return None
    match = _XMP_SETTINGS.search(bytes(xmp))
    return html.unescape(match.group(1).decode("utf-8", errors="replace")) if match else None


def flatten_for(image, fmt: OutputFormat):
    """``image`` in a mode ``fmt`` can hold: JPEG has no alpha (transparent pixels are laid on white, not
    dropped to black), WebP holds RGB or RGBA; PNG takes anything. Returns ``image`` itself when it fits."""
    from PIL import Image

    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if fmt.name == "webp" and image.mode not in ("RGB", "RGBA"):
        return image.convert("RGBA" if has_alpha else "RGB")
    if fmt.name == "jpeg" and image.mode not in ("RGB", "L"):
        if not has_alpha:
            return image.convert("RGB")
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, "white")
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image


def save_image(image, handle, fmt: OutputFormat, parameters: str | None = None, settings: dict | None = None) -> None:
    """Encode ``image`` in ``fmt`` to a binary file handle, with the ``parameters`` text and the ``settings`` JSON
    when given (PNG: text chunks; JPEG/WebP: EXIF UserComment and XMP; see the module docstring).

    Raises:
        UsageError: the metadata does not fit in a JPEG (see :func:`check_metadata_room`).
        OSError: the handle cannot be written.
    """
    if fmt.name == "png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        if parameters is not None:
            info.add_text("parameters", parameters)
        if settings is not None:
            info.add_text("dalle", json.dumps(settings, ensure_ascii=False))
        image.save(handle, format="PNG", pnginfo=info)
        return
    from PIL import Image

    options: dict = {"quality": fmt.quality or DEFAULT_QUALITY}
    if parameters is not None:
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(parameters)
        options["exif"] = exif
    if settings is not None:
        options["xmp"] = _xmp_packet(settings)
    try:
        flatten_for(image, fmt).save(handle, format=fmt.name.upper(), **options)
    except ValueError as exc:  # Pillow: "EXIF data is too long", "XMP data is too long" (a JPEG segment)
        raise UsageError(f"the image's metadata does not fit in a {fmt.name.upper()} ({exc}); "
                         "choose --format png or webp") from exc


def write_image(image, folder: Path, settings: dict, sampler: str, index: int | None = None, *,
                keep_index: bool = False, fmt: OutputFormat | None = None) -> Path:
    """Write ``image`` in ``fmt`` (default PNG) with both metadata records (module docstring), atomically,
    never overwriting a file; the name ends in the format's suffix. See :func:`write_png` for the arguments.

    Raises:
        DiskFullError: no space left (or quota exceeded); the temporary file is removed, nothing is left.
        UsageError: no free file name in ``folder``, or metadata too long for a JPEG.
    """
    fmt = fmt or PNG
    parameters = a1111_parameters(settings, sampler)
    return _place(lambda handle: save_image(image, handle, fmt, parameters, settings), folder, settings, index,
                  keep_index, fmt.suffix)


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
    return write_image(image, folder, settings, sampler, index, keep_index=keep_index)


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


def _place(fill, folder: Path, settings: dict, index: int | None, keep_index: bool = False,
           suffix: str = ".png") -> Path:
    """Write a temporary file in ``folder`` with ``fill(handle)`` and link it to its final name (see
    :func:`write_png`)."""
    with staged_file(folder, suffix, what=f"an image in {folder}",
                     advice="Free some space or choose another --out folder") as tmp:
        with open(tmp, "wb") as handle:
            fill(handle)
        if keep_index and index is not None:  # the number stays; a clash takes a copy tag (copy 1: no tag)
            return _atomic_link(tmp, folder, lambda copy: image_name(index, settings["seed"], settings["prompt"],
                                                                     suffix, copy=copy), 1)
        start = next_index(folder) if index is None else index
        return _atomic_link(tmp, folder, lambda i: image_name(i, settings["seed"], settings["prompt"], suffix),
                            start)


def parse_a1111(text: str) -> dict:
    """Parse an AUTOMATIC1111 ``parameters`` chunk into our settings keys (what it holds of
    :data:`A1111_FIELDS`; "Size" as ``width`` and ``height``); a value of the wrong type is left out."""
    lines = text.strip().split("\n")
    first_label = A1111_FIELDS[0][0] + ":"
    fields_line = lines[-1] if len(lines) > 1 and first_label in lines[-1] else ""
    body = lines[:-1] if fields_line else lines
    prompt_lines, negative = [], None
    for line in body:
        if line.startswith(A1111_NEGATIVE):
            negative = line[len(A1111_NEGATIVE):].strip()
        elif negative is None:
            prompt_lines.append(line)
        else:
            negative += "\n" + line
    result: dict = {"prompt": "\n".join(prompt_lines).strip(), "negative_prompt": negative}
    fields = dict(re.findall(r"\s*([\w ]+):\s*([^,]+)", fields_line))
    for label, key, kind in A1111_FIELDS:
        if label not in fields:
            continue
        value = fields[label].strip()
        if key == "size":
            width, _, height = value.partition("x")
            if width.isdigit() and height.isdigit():
                result["width"], result["height"] = int(width), int(height)
            continue
        try:
            result[key] = kind(value)
        except ValueError:
            pass
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


def _embedded_texts(image) -> dict:
    """The metadata texts of an open image: PNG text chunks, plus ``parameters`` from an EXIF UserComment and
    ``dalle`` from XMP (JPEG, WebP) where the chunks do not hold them. Damaged EXIF is skipped, never raised."""
    text = dict(getattr(image, "text", {}) or image.info)
    if "parameters" not in text:
        try:
            comment = read_user_comment(image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT))
        except Exception:  # noqa: BLE001 - EXIF from anyone: any damage means "no comment"
            comment = None
        if comment:
            text["parameters"] = comment
    if "dalle" not in text:
        stored = read_xmp_settings(image.info.get("xmp") or image.info.get("XML:com.adobe.xmp"))
        if stored is not None:
            text["dalle"] = stored
    return text


def read_metadata(path: Path) -> dict:
    """The generation settings stored in an image: our ``dalle`` record (PNG chunk or XMP), else AUTOMATIC1111
    ``parameters`` (PNG chunk or EXIF UserComment), else ComfyUI's ``prompt``/``workflow`` chunks.

    Returns:
        A dict with a ``source`` key ("dalle", "a1111" or "comfyui") and the settings found.

    Raises:
        UsageError: the file is not a readable image or carries no generation parameters.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = _embedded_texts(image)
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
    if "prompt" in text or "workflow" in text:
        found = parse_comfyui(text.get("prompt"), text.get("workflow"))
        if found:
            return {"source": "comfyui", **found}
    raise UsageError(f"{path} carries no generation parameters")


_COMFY_SAMPLERS = {"euler": "euler", "euler_ancestral": "euler-a", "dpmpp_2m": "dpm++", "ddim": "ddim",
                   "ddpm": "ddpm", "uni_pc": "unipc", "lcm": "lcm"}  # ComfyUI sampler_name -> our scheduler
_COMFY_TEXT_KEYS = ("text", "text_g", "value", "string", "prompt", "conditioning", "conditioning_1",
                    "conditioning_to")
_MAX_HOPS = 16  # links followed from one node: a graph from anyone may loop


def _json_or_none(text):
    if not isinstance(text, str) or len(text) > 50_000_000:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # damaged, or nested deeper than the parser's stack
        return None


def parse_comfyui(prompt_text, workflow_text=None) -> dict:
    """What a ComfyUI image's ``prompt`` chunk (the API graph: node id -> ``{class_type, inputs}``) or, without
    one, its ``workflow`` chunk (the editor's graph) says: the positive and negative prompt, seed, steps,
    guidance, sampler, model (checkpoint file) and size of its first KSampler, where they can be found.

    Args:
        prompt_text: the ``prompt`` chunk's text, or None.
        workflow_text: the ``workflow`` chunk's text, or None.

    Returns:
        Our settings keys (``sampler`` is ComfyUI's name, with its scheduler when not "normal"; ``scheduler``
        is ours where one matches, for ``--from``); values of the wrong type are left out. ``{}`` when
        nothing is found: damaged JSON, loops and odd values never raise.
    """
    graph = _json_or_none(prompt_text)
    found = _from_comfy_prompt(graph) if isinstance(graph, dict) else {}
    if not found:
        workflow = _json_or_none(workflow_text)
        found = _from_comfy_workflow(workflow) if isinstance(workflow, dict) else {}
    sampler, schedule = found.pop("sampler_name", None), found.pop("schedule", None)
    if isinstance(sampler, str):
        ours = _COMFY_SAMPLERS.get(sampler)
        if ours == "dpm++" and schedule == "karras":
            ours = "dpm++-karras"
        found["scheduler"] = ours
        found["sampler"] = sampler if schedule in (None, "normal") or not isinstance(schedule, str) \
            else f"{sampler} ({schedule})"
    return {key: value for key, value in found.items() if value is not None and not isinstance(value, bool)
            and isinstance(value, _SETTING_TYPES.get(key, object))}


def _as_float(value):
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return None
    return value


def _from_comfy_prompt(graph: dict) -> dict:
    nodes = {str(key): node for key, node in graph.items() if isinstance(node, dict)}

    def inputs(node) -> dict:
        found = node.get("inputs") if isinstance(node, dict) else None
        return found if isinstance(found, dict) else {}

    def linked(value):  # a link is [node id, output index]
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)):
            return nodes.get(str(value[0]))
        return None

    def resolve(value, keys):  # a value, or the first of ``keys`` in the node it links to, hop by hop
        for _ in range(_MAX_HOPS):
            node = linked(value)
            if node is None:
                return value
            value = next((inputs(node)[k] for k in keys if k in inputs(node)), None)
        return None

    samplers = [node for node in nodes.values()
                if isinstance(node.get("class_type"), str) and node["class_type"].startswith("KSampler")]
    if not samplers:
        return {}
    given = inputs(samplers[0])
    found = {"seed": resolve(given.get("seed", given.get("noise_seed")), ("seed", "noise_seed", "value")),
             "steps": resolve(given.get("steps"), ("steps", "value")),
             "guidance_scale": resolve(given.get("cfg"), ("cfg", "value")),
             "sampler_name": resolve(given.get("sampler_name"), ("sampler_name", "value")),
             "schedule": resolve(given.get("scheduler"), ("scheduler", "value")),
             "prompt": resolve(given.get("positive"), _COMFY_TEXT_KEYS),
             "negative_prompt": resolve(given.get("negative"), _COMFY_TEXT_KEYS),
             "model": resolve(given.get("model"), ("ckpt_name", "unet_name", "model_path", "model"))}
    latent = linked(given.get("latent_image"))
    for _ in range(_MAX_HOPS):  # through upscale/batch nodes to the EmptyLatentImage
        if latent is None or "width" in inputs(latent):
            break
        latent = linked(inputs(latent).get("samples"))
    if latent is not None:
        found.update(width=inputs(latent).get("width"), height=inputs(latent).get("height"))
    found["guidance_scale"] = _as_float(found["guidance_scale"])
    return found if any(isinstance(found[k], (str, int)) for k in ("prompt", "seed", "steps")) else {}


def _from_comfy_workflow(workflow: dict) -> dict:
    nodes = {}
    for node in workflow.get("nodes") if isinstance(workflow.get("nodes"), list) else []:
        if isinstance(node, dict) and isinstance(node.get("id"), (int, str)):
            nodes[str(node["id"])] = node
    links = {}  # link id -> source node
    for link in workflow.get("links") if isinstance(workflow.get("links"), list) else []:
        if isinstance(link, list) and len(link) >= 2 and isinstance(link[0], (int, str)):
            links[str(link[0])] = nodes.get(str(link[1]))

    def widgets(node) -> list:
        found = node.get("widgets_values") if isinstance(node, dict) else None
        return found if isinstance(found, list) else []

    def source(node, name):  # the node linked into input ``name``
        for entry in node.get("inputs") if isinstance(node, dict) and isinstance(node.get("inputs"), list) else []:
            if isinstance(entry, dict) and entry.get("name") == name and isinstance(entry.get("link"), (int, str)):
                return links.get(str(entry["link"]))
        return None

    def text(node):
        for _ in range(_MAX_HOPS):
            if node is None:
                return None
            if "CLIPTextEncode" in str(node.get("type")) and widgets(node) and isinstance(widgets(node)[0], str):
                return widgets(node)[0]
            node = source(node, "conditioning") or source(node, "conditioning_1")
        return None

    sampler = next((node for node in nodes.values() if str(node.get("type")).startswith("KSampler")), None)
    if sampler is None:
        return {}
    values = widgets(sampler)
    if str(sampler.get("type")) == "KSamplerAdvanced":  # add_noise, seed, control, steps, cfg, sampler, ...
        values = values[1:]
    picked = dict(zip(("seed", "control", "steps", "guidance_scale", "sampler_name", "schedule"), values))
    picked.pop("control", None)
    picked["guidance_scale"] = _as_float(picked.get("guidance_scale"))
    picked.update(prompt=text(source(sampler, "positive")), negative_prompt=text(source(sampler, "negative")))
    model = source(sampler, "model")
    for _ in range(_MAX_HOPS):  # through LoRA loaders to the checkpoint loader
        if model is None or "Checkpoint" in str(model.get("type")):
            break
        model = source(model, "model")
    if model is not None and widgets(model):
        picked["model"] = widgets(model)[0]
    latent = source(sampler, "latent_image")
    if latent is not None and len(widgets(latent)) >= 2:
        picked.update(width=widgets(latent)[0], height=widgets(latent)[1])
    return picked if any(isinstance(picked.get(k), (str, int)) for k in ("prompt", "seed", "steps")) else {}


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
