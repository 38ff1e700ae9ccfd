"""Weight files judged by their content, never by their name: refuse anything but safetensors, read headers,
tell a single-file checkpoint's family, digest a file; and what a model folder's configs say of it (pipeline
class, trained size).

A leaf module (it imports only :mod:`dallecli.errors`, and :mod:`dallecli.atomic` and :mod:`dallecli.config`
to remember digests), so the engine, the store and training all use it, and the store never imports the engine.

A ``.safetensors`` file starts with an 8-byte little-endian header length N, then N bytes of JSON that give
each tensor's byte range; the file must be exactly ``8 + N + max(end offset)`` bytes long. Pickles (the
format behind ``.bin``, ``.ckpt``, ``.pt``) start with a protocol opcode (``0x80``) or, for torch's zip
format, with ``PK``. Nothing here unpickles or imports torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from dallecli.errors import CorruptWeightsError, UnsafeWeightsError, UnsupportedCheckpointError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
LFS_POINTER_PREFIX = b"version https://git-lfs"

# single-file checkpoints (the AUTOMATIC1111/Civitai layout): key prefixes of the original LDM names
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer.text_model."
SD2_OPENCLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP = "conditioner.embedders.1.model."
SUPPORTED = "SD 1.x, SD 2.x and SDXL base single files"


def _inspect(path: Path) -> tuple[str, dict | None]:
    """(kind as :func:`sniff` says it, the parsed header when the kind is "safetensors")."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(64)
        if head.startswith(LFS_POINTER_PREFIX):
            return "lfs-pointer", None
        if head.startswith(b"PK\x03\x04"):
            return "zip", None
        header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 9 else None
        if header_len is None or header_len > MAX_HEADER_BYTES or head[8:9] != b"{":
            if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
                return "pickle", None
            return "unknown", None
        if 8 + header_len > size:
            return "truncated", None
        handle.seek(8)
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "unknown", None
    if not isinstance(header, dict):
        return "unknown", None
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + header_len + (max(ends) if ends else 0)
    if size < expected:
        return "truncated", None
    if size > expected:
        return "oversized", None
    return "safetensors", header


def sniff(path: Path) -> str:
    """Classify a file by its first bytes and size.

    A safetensors header is recognised first (its 8-byte length, then JSON starting with ``{``): a header of
    640 bytes makes the file start with ``0x80 0x02``, the opening of a protocol-2 pickle.

    Args:
        path: the file.

    Returns:
        "safetensors" (exactly as long as its header says), "pickle", "zip" (torch's zipped pickle),
        "lfs-pointer", "truncated" (shorter than its header says), "oversized" (bytes after the last tensor,
        which the safetensors format does not allow) or "unknown".

    Raises:
        OSError: the file cannot be read.
    """
    return _inspect(path)[0]


def read_header(path: Path) -> dict:
    """The JSON header of a complete safetensors file, read without reading any tensor.

    Args:
        path: the file.

    Returns:
        ``{tensor name: {"dtype", "shape", "data_offsets"}}``, with ``"__metadata__"`` (a dict of strings)
        when the file has one.

    Raises:
        UnsafeWeightsError, CorruptWeightsError: as :func:`verify_safetensors`.
        OSError: the file cannot be read.
    """
    kind, header = _inspect(path)
    if header is None:
        raise _refusal(path, kind)
    return header


def verify_safetensors(path: Path) -> None:
    """Check that ``path`` is a complete safetensors file.

    Args:
        path: the file.

    Raises:
        UnsafeWeightsError: the content is a pickle (whatever the file is called).
        CorruptWeightsError: truncated, a Git LFS pointer, or not safetensors at all; the message says to
            re-download.
        OSError: the file cannot be read.
    """
    read_header(path)


def _refusal(path: Path, kind: str) -> Exception:
    """The error that says why a file of ``kind`` (not "safetensors") is refused."""
    if kind in ("pickle", "zip"):
        return UnsafeWeightsError(
            f"{path.name} is a pickle file whatever its name says; refusing to load it (pickles can run code). "
            "Use a .safetensors version of these weights"
        )
    if kind == "truncated":
        return CorruptWeightsError(
            f"{path} is truncated (shorter than its safetensors header says): an interrupted download? Download it "
            "again"
        )
    if kind == "oversized":
        return CorruptWeightsError(
            f"{path} has bytes after its last tensor (a safetensors file ends where its header says): it is "
            "damaged or not what it claims to be; download it again"
        )
    if kind == "lfs-pointer":
        return CorruptWeightsError(
            f"{path} is a Git LFS pointer, not the weights; fetch the real file (git lfs pull) or re-download"
        )
    return CorruptWeightsError(f"{path} is not a safetensors file (no safetensors header); dalle loads weights from "
                               ".safetensors files only")


def refuse_pickle_only(folder: Path, what: str) -> None:
    """Raise when ``folder`` holds pickle weights but no ``.safetensors``.

    Raises:
        UnsafeWeightsError: naming the pickle files found and the safe alternative.
    """
    files = [p for p in folder.rglob("*") if p.is_file()]
    pickles = [p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles and not any(p.suffix.lower() == ".safetensors" for p in files):
        shown = ", ".join(sorted(pickles)[:3])
        raise UnsafeWeightsError(
            f"{what} has only pickle weights ({shown}); dalle loads .safetensors only. "
            "Use a repo or folder that provides .safetensors files"
        )


def verify_folder(folder: Path) -> list[Path]:
    """Verify every ``.safetensors`` under ``folder`` and refuse components with only pickle weights.

    Returns:
        The safetensors files checked.

    Raises:
        UnsafeWeightsError, CorruptWeightsError: as :func:`verify_safetensors` and :func:`refuse_pickle_only`.
    """
    components = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    for component in components + [folder]:
        direct = [p for p in component.iterdir() if p.is_file()]
        pickles = [p for p in direct if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(p.suffix.lower() == ".safetensors" for p in direct):
            refuse_pickle_only(component, f"component '{component.name}'")
    checked = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".safetensors")
    for path in checked:
        verify_safetensors(path)
    return checked


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a complete safetensors file, from its header alone.

    Raises:
        UnsafeWeightsError, CorruptWeightsError: as :func:`verify_safetensors`.
        OSError: the file cannot be read.
    """
    return {k: tuple(v["shape"]) for k, v in read_header(path).items()
            if k != "__metadata__" and isinstance(v, dict) and "shape" in v}


def describe_unknown(keys: list[str]) -> str:
    """One phrase naming what a file that is not a supported pipeline checkpoint holds."""
    joined = "\n".join(keys)
    if "double_blocks." in joined or "single_blocks." in joined:
        return "a FLUX transformer"
    if "joint_blocks." in joined:
        return "an SD3 (MMDiT) transformer"
    if "lora_" in joined or ".lora_down." in joined or ".lora_A." in joined or ".lora_B." in joined:
        return "a LoRA (use it with --lora)"
    if "conditioner.embedders.0.model." in joined and UNET in joined:
        return "an SDXL refiner"
    if any(k.startswith(("encoder.", "decoder.", VAE)) for k in keys) and not any(k.startswith(UNET) for k in keys):
        return "a VAE only (use a VAE folder with --vae)"
    if any(k.startswith(UNET) for k in keys):
        return "a UNet without the text encoder or VAE it needs"
    shown = ", ".join(keys[:2])
    return f"an unknown layout ({len(keys)} tensors, e.g. {shown})"


def unsupported_checkpoint(path: Path, what: str) -> UnsupportedCheckpointError:
    """The refusal of a single file that holds ``what`` ("a FLUX transformer", ...)."""
    return UnsupportedCheckpointError(f"{path.name} is {what}; dalle loads {SUPPORTED} (.safetensors)")


def single_file_family(path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    """The family of a single-file pipeline checkpoint, from its tensor names and shapes alone (no tensor is read).

    Args:
        path: a safetensors file in the original LDM key layout.
        shapes: its :func:`tensor_shapes`, when already read.

    Returns:
        "sd1", "sd2" (SD 2.x: whether it is the 512-px epsilon "base" model the header cannot say) or "sdxl".

    Raises:
        UnsupportedCheckpointError: not a whole SD 1.x, SD 2.x or SDXL base pipeline (a FLUX or SD3 transformer, a
            LoRA, a VAE, a refiner, an inpainting UNet, ...; one line naming what it is).
        UnsafeWeightsError, CorruptWeightsError: as :func:`verify_safetensors`.
    """
    shapes = tensor_shapes(path) if shapes is None else shapes
    if SDXL_OPENCLIP + "positional_embedding" in shapes and SDXL_CLIP + "embeddings.token_embedding.weight" in shapes:
        family = "sdxl"
    elif SD2_OPENCLIP + "token_embedding.weight" in shapes:
        family = "sd2"
    elif SD1_CLIP + "embeddings.token_embedding.weight" in shapes:
        family = "sd1"
    else:
        raise unsupported_checkpoint(path, describe_unknown(sorted(shapes)))
    first_conv = shapes.get(UNET + "input_blocks.0.0.weight")
    if first_conv is None or VAE + "decoder.conv_in.weight" not in shapes:
        raise unsupported_checkpoint(path, describe_unknown(sorted(shapes)))
    if len(first_conv) > 1 and first_conv[1] != 4:
        raise unsupported_checkpoint(path, f"an inpainting or other {first_conv[1]}-channel UNet")
    return family


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file, remembered by (path, size, mtime) in dalle's cache
    (:func:`dallecli.config.cache_dir`), so that a multi-GB checkpoint is hashed once (AUTOMATIC1111's
    "Model hash" is the first 10 hex digits).

    Raises:
        OSError: the file cannot be read.
    """
    import hashlib

    from dallecli.atomic import write_file
    from dallecli.config import cache_dir
    from dallecli.errors import DiskFullError

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache_dir() / "file-hashes" / key
    try:
        return memo.read_text(encoding="utf-8").strip()
    except OSError:
        pass
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            sha.update(chunk)
    value = f"sha256:{sha.hexdigest()}"
    try:
        write_file(memo, value)
    except (OSError, DiskFullError):  # only a memo: the next call hashes again
        pass
    return value


def _class_name_in(config: Path) -> str | None:
    """``_class_name`` from a diffusers JSON config file (None when absent or unreadable)."""
    try:
        found = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found.get("_class_name") if isinstance(found, dict) else None


def pipeline_class_name(folder: Path) -> str | None:
    """``_class_name`` from a pipeline folder's ``model_index.json`` (None when absent or unreadable)."""
    return _class_name_in(folder / "model_index.json")


def component_class_name(folder: Path) -> str | None:
    """``_class_name`` from a component folder's ``config.json`` (None when absent or unreadable)."""
    return _class_name_in(folder / "config.json")


def default_size(folder: Path) -> int | None:
    """The image size (pixels) a pipeline folder was trained for: UNet/transformer ``sample_size`` times the
    VAE's scale factor, or None when the configs do not say."""
    try:
        denoiser = next(folder / name / "config.json" for name in ("unet", "transformer")
                        if (folder / name / "config.json").exists())
        sample = json.loads(denoiser.read_text(encoding="utf-8")).get("sample_size")
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    except (StopIteration, OSError, ValueError, AttributeError):
        return None
    if not isinstance(sample, int):
        return None
    return sample * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
