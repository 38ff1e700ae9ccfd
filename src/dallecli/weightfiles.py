"""Weight files judged by their content, never by their name: refuse anything but safetensors, read headers.

A leaf module (it imports only :mod:`dallecli.errors`), so the engine, the store and training all use it.

A ``.safetensors`` file starts with an 8-byte little-endian header length N, then N bytes of JSON that give
each tensor's byte range; the file must be exactly ``8 + N + max(end offset)`` bytes long. Pickles (the
format behind ``.bin``, ``.ckpt``, ``.pt``) start with a protocol opcode (``0x80``) or, for torch's zip
format, with ``PK``. Nothing here unpickles or imports torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from dallecli.errors import CorruptWeightsError, UnsafeWeightsError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
LFS_POINTER_PREFIX = b"version https://git-lfs"


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
