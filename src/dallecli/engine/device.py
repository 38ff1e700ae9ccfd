"""Device and dtype policy.

:func:`choose_dtype` is a pure function of the device and what the hardware supports, so that it can be
tested for every device on any machine; :func:`resolve_device` asks torch what exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from dallecli.errors import DeviceUnavailableError, UsageError

DTYPES = ("auto", "float32", "float16", "bfloat16")
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class DtypeChoice:
    """A dtype name ("float32", "float16" or "bfloat16") and the reason it was chosen (for ``dalle doctor``)."""

    dtype: str
    reason: str


def normalize_dtype(requested: str | None) -> str:
    """Map user spellings (fp16, bf16, ...) to a name in :data:`DTYPES`.

    Raises:
        UsageError: an unknown dtype name.
    """
    name = (requested or "auto").lower()
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise UsageError(f"unknown --dtype '{requested}'; choose one of {', '.join(DTYPES)}")
    return name


def choose_dtype(device: str, requested: str | None = None, *, cuda_bf16: bool = False) -> DtypeChoice:
    """Pick the compute dtype for ``device``.

    Policy: an explicit request wins; CUDA gets bfloat16 where the GPU supports it (no fp16 overflow to
    NaN), else float16; MPS gets float32 (half precision on MPS produces NaN/black images with many models);
    CPU gets float32.

    Args:
        device: a torch device string ("cpu", "cuda", "cuda:1", "mps").
        requested: "auto"/None or a dtype name (aliases such as "fp16" accepted).
        cuda_bf16: whether the CUDA device supports bfloat16 (compute capability 8.0+).

    Raises:
        UsageError: an unknown dtype name.
    """
    name = normalize_dtype(requested)
    if name != "auto":
        return DtypeChoice(name, "requested with --dtype")
    kind = device.split(":")[0]
    if kind == "cuda":
        if cuda_bf16:
            return DtypeChoice("bfloat16", "CUDA GPU with bfloat16 support")
        return DtypeChoice("float16", "CUDA GPU without bfloat16 support")
    if kind == "mps":
        return DtypeChoice("float32", "MPS: half precision is unreliable there")
    return DtypeChoice("float32", "CPU")


def pick_device(requested: str | None, *, cuda: bool, mps: bool, cuda_count: int = 1) -> str:
    """Pure device policy: ``auto`` picks CUDA, then MPS, then CPU.

    Raises:
        DeviceUnavailableError: a requested device that this machine does not have.
        UsageError: an unknown device name.
    """
    name = (requested or "auto").lower()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise UsageError(f"unknown --device '{requested}'; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and (not cuda or (index and int(index) >= cuda_count)):
        raise DeviceUnavailableError(f"--device {name} is not available here (no such CUDA device); use --device cpu")
    if kind == "mps" and not mps:
        raise DeviceUnavailableError("--device mps is not available here (needs Apple silicon); use --device cpu")
    return name


def resolve_device(requested: str | None = None) -> str:
    """The torch device string to use, asking torch which devices exist (imports torch)."""
    import torch

    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    cuda = torch.cuda.is_available()
    return pick_device(requested, cuda=cuda, mps=mps, cuda_count=torch.cuda.device_count() if cuda else 0)


def resolve_dtype(device: str, requested: str | None = None) -> DtypeChoice:
    """:func:`choose_dtype` with the hardware facts filled in from torch."""
    import torch

    cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return choose_dtype(device, requested, cuda_bf16=cuda_bf16)
