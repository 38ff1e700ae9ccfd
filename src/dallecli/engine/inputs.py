"""Images given to dalle (init images, masks, training images), cleaned one way for every command.

:func:`to_rgb8` turns any Pillow image into 8-bit RGB: EXIF orientation applied (a phone JPEG with
Orientation=6 is used upright), transparency composited on white, grayscale/palette/CMYK converted, 16-bit and
32-bit samples scaled (not clipped). ``dalle finetune`` (:mod:`dallecli.training.dataset`) and the image-input
commands (``dalle generate --image``, ``dalle edit``, ``dalle variations``) share it.

:func:`load_init_image` and :func:`load_mask` read the inputs of img2img and inpainting, from a file or from the
bytes of an :class:`Upload` (``dalle serve``: nothing is written to disk), and raise
:class:`~dallecli.errors.UsageError` naming the file when it cannot be used. This module imports neither torch
nor diffusers.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from dallecli.errors import UsageError, first_line

MASK_THRESHOLD = 128  # mask value (0-255) from which a pixel is repainted; below it the input pixel is kept
UPLOAD_PREFIX = "upload:"  # how an uploaded input is named in metadata and messages: it has no path


@dataclass(frozen=True)
class Upload:
    """An input image received over HTTP (``dalle serve``), read from its bytes: never written to disk.

    Attributes:
        name: the client's file name, reduced to a plain, printable base name (at most 100 characters).
        data: the file's bytes.
        what: the request field it came in (``image``, ``mask``, ``init_images[0]``), named in messages.
    """

    name: str
    data: bytes = field(repr=False)
    what: str = "image"

    def __post_init__(self):
        base = self.name.replace("\\", "/").rsplit("/", 1)[-1]
        clean = "".join(c for c in base if c.isprintable()).strip()[:100]
        object.__setattr__(self, "name", clean or "image")

    @property
    def source(self) -> str:
        """``upload:<name>``: what the image's metadata records instead of a path."""
        return UPLOAD_PREFIX + self.name


def is_upload(recorded: object) -> bool:
    """Whether a path recorded in an image's metadata names an upload (``upload:<name>``), not a file."""
    return isinstance(recorded, str) and recorded.startswith(UPLOAD_PREFIX)


def _to_8bit(image):
    """Single-channel 16/32-bit integer or float image -> mode "L", scaled to 0-255 (never clipped)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image)
    if image.mode == "F":
        array = array.astype(np.float64)
        peak = float(np.nanmax(array)) if array.size else 1.0
        array = array * 255.0 if peak <= 1.0 else array * (255.0 / max(peak, 255.0))
    else:
        array = array.astype(np.float64)
        peak = float(array.max()) if array.size else 0.0
        # 16-bit data (the usual case) is scaled by 255/65535; wider integers by their own maximum
        full = 65535.0 if peak <= 65535 else float(2 ** int(np.ceil(np.log2(peak + 1))) - 1)
        array = array * (255.0 / full)
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")


def has_alpha(image) -> bool:
    """Whether a Pillow image carries transparency (an alpha band, or a palette/colour key marked transparent)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def to_rgb8(image):
    """Any Pillow image -> 8-bit RGB.

    EXIF orientation is applied; any transparency (RGBA, LA, PA, palette with a transparent colour) is
    composited on white; 16-bit and 32-bit single-channel images are scaled to 0-255, not clipped; L, 1, P,
    CMYK, YCbCr, LAB and HSV go through Pillow's conversions.
    """
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _to_8bit(image).convert("RGB")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (OSError, ValueError, ImportError, ImageCms.PyCMSError):
            pass
    return image.convert("RGB")


def load_rgb(path: Path):
    """Open ``path`` and return it as an 8-bit RGB PIL image (see :func:`to_rgb8`)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return to_rgb8(image)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as 64 lower-case hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class InputImage:
    """An init image or mask as read from disk or received (:class:`Upload`).

    Attributes:
        path: the file, absolute; for an upload, ``Path("upload:<name>")`` (no such file: see ``source``).
        sha256: SHA-256 of the file's bytes (64 hex digits), what ``--from`` checks before replaying.
        rgb: the image as 8-bit RGB (:func:`to_rgb8`), upright; size = the file's upright size in pixels.
        alpha: the transparency as an 8-bit "L" image of the same size (255 = opaque), or None when the file has
            none.
    """

    path: Path
    sha256: str
    rgb: object
    alpha: object | None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.rgb.size

    @property
    def source(self) -> str:
        """What the metadata records: the absolute path, or ``upload:<name>``."""
        return str(self.path)

    @property
    def name(self) -> str:
        """How messages name it: the file name, or ``upload:<name>``."""
        return self.source if is_upload(self.source) else self.path.name


def _open(source: Path | Upload, what: str):
    """``(upright image, path recorded, SHA-256)`` of a file or an upload. A file's bytes are read once, then
    both hashed and decoded, so the digest is that of the pixels used even when the file changes meanwhile.

    Raises:
        UsageError: missing, not a file, unreadable, or not an image Pillow reads (the message names it).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Upload):
        what, data, shown, recorded = source.what, source.data, source.source, Path(source.source)
    else:
        shown = Path(source)
        if not shown.is_file():
            raise UsageError(f"{what} {shown} does not exist" if not shown.exists() else f"{what} {shown} is not a file")
        try:
            with open(shown, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise UsageError(f"{what} {shown} is not a readable image ({first_line(exc)})") from None
        recorded = shown.resolve()
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            upright.load()
    except UnidentifiedImageError:  # PIL's message names the file object (a BytesIO's address)
        raise UsageError(f"{what} {shown} is not a readable image (not a format Pillow knows)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"{what} {shown} is not a readable image ({first_line(exc)})") from None
    return upright, recorded, hashlib.sha256(data).hexdigest()


def load_init_image(path: Path | Upload, what: str = "--image") -> InputImage:
    """Read an init image (img2img, inpainting, variations) the way training images are read.

    Args:
        path: an image file Pillow reads (PNG, JPEG, WebP, ...), or an :class:`Upload` of one.
        what: how the message names the file's option ("--image", "IMAGE"; an upload names its own field).

    Returns:
        An :class:`InputImage` (RGB after :func:`to_rgb8`; ``alpha`` kept for ``dalle edit`` without a mask).

    Raises:
        UsageError: the file is missing, not a file, or not a readable image (the message names it).
    """
    upright, recorded, digest = _open(path, what)
    alpha = None
    if has_alpha(upright) and upright.mode not in ("I", "F") and not upright.mode.startswith("I;16"):
        alpha = upright.convert("RGBA").getchannel("A")
    return InputImage(recorded, digest, to_rgb8(upright), alpha)


def load_mask(path: Path | Upload, size: tuple[int, int], what: str = "--mask", *,
              opaque_repaints: bool = False) -> InputImage:
    """Read an inpainting mask: white = repaint, black = keep; a mask with transparent pixels uses transparency
    the way OpenAI's edits endpoint does (transparent = repaint; a fully opaque alpha channel is ignored).

    Args:
        path: the mask file, or an :class:`Upload` of one.
        size: (width, height) of the init image in pixels; the mask must have the same.
        what: how the message names the file's option (an upload names its own field).
        opaque_repaints: read a mask with transparency the way AUTOMATIC1111 does (its alpha is the mask:
            opaque = repaint) instead of OpenAI's way.

    Returns:
        An :class:`InputImage` whose ``rgb`` is the mask as mode "L" (0 keep .. 255 repaint).

    Raises:
        UsageError: unreadable file, or a size different from the image's (both sizes named).
    """
    upright, recorded, digest = _open(path, what)
    if isinstance(path, Upload):
        what, path = path.what, path.source
    if upright.size != tuple(size):
        raise UsageError(f"{what} {path} is {upright.size[0]}x{upright.size[1]} but the image is "
                         f"{size[0]}x{size[1]}; the mask must have the image's size")
    alpha = upright.convert("RGBA").getchannel("A") if has_alpha(upright) else None
    if alpha is not None and alpha.getextrema()[0] < 255:
        from PIL import ImageOps

        mask = alpha if opaque_repaints else ImageOps.invert(alpha)  # OpenAI: transparent (0) -> repaint (255)
    else:  # no alpha, or an opaque one (a black-and-white mask saved as RGBA): the grey levels say it
        mask = to_rgb8(upright).convert("L")
    return InputImage(recorded, digest, mask, None)


def mask_from_alpha(image: InputImage):
    """The repaint mask of an RGBA image given without a mask ("L", 255 where fully transparent), or None when
    it has no transparency or no pixel is transparent enough to be repainted."""
    from PIL import ImageOps

    if image.alpha is None:
        return None
    mask = ImageOps.invert(image.alpha)
    return mask if mask.getextrema()[1] >= MASK_THRESHOLD else None


def nearest_size(value: int, base: int = 8) -> int:
    """The multiple of ``base`` nearest to ``value`` pixels (halves round up), at least ``base``."""
    return max(base, (value + base // 2) // base * base)
