"""Device and dtype policy.

:func:`choose_dtype` is a pure function of the device and what the hardware supports, so that it can be
tested for every device on any machine; :func:`resolve_device` asks torch what exists and
:func:`cpu_bf16_kind` reads the CPU's instruction-set flags.
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


def normalize_dtype(requested: str | None, source: str = "--dtype") -> str:
    """Map user spellings (fp16, bf16, ...) to a name in :data:`DTYPES`.

    Args:
        requested: the name given; None means "auto".
        source: where it came from, for the error (``--dtype``, ``DALLE_DTYPE``, the config file's key).

    Raises:
        UsageError: an unknown dtype name.
    """
    name = (requested or "auto").lower()
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise UsageError(f"unknown {source} '{requested}'; choose one of {', '.join(DTYPES)}")
    return name


# CPU bfloat16 support, as :func:`cpu_bf16_kind` reports it: "amx" (AMX-BF16 tile instructions, Intel Xeon since
# Sapphire Rapids: oneDNN runs bf16 matmuls and convolutions on the tiles), "native" (AVX-512-BF16 dot products
# without AMX), "avx512" (no bf16 instructions, but oneDNN runs bf16 matmuls/convolutions with AVX-512
# conversions: half the memory traffic, fp32 arithmetic), or None (AVX2 or less: bf16 is emulated slowly).
CPU_BF16_KINDS = ("amx", "native", "avx512", None)


def choose_dtype(device: str, requested: str | None = None, *, cuda_bf16: bool = False,
                 cpu_bf16: str | None = None, model_dtype: str | None = None) -> DtypeChoice:
    """Pick the compute dtype for ``device``.

    Policy: an explicit request wins; CUDA gets bfloat16 where the GPU supports it (no fp16 overflow to
    NaN), else float16; MPS gets float32 (half precision on MPS produces NaN/black images with many models).
    The CPU gets bfloat16 where it has AMX tiles and float32 elsewhere, each as measured (BENCHMARKS.md):
    with AMX-BF16 (a 2-core Xeon) the SD-Turbo-architecture UNet step took 1.08 s against 3.62 s in float32
    and the VAE decode 2.44 s against 12.57 s (channels-last), the image at 49.2 dB PSNR against float32's
    (the embedded model: worst 44.2 dB over :data:`BF16_QUALITY_PAIRS`, and no faster: 286 ms against 279 ms);
    without AMX it was slower than float32 on every CPU measured: on AVX-512 without bf16 instructions (oneDNN
    converts to float32) 2.4x slower for an SD-Turbo-architecture 512x512 image, and on a Xeon with
    AVX-512-BF16 but no AMX the UNet step took 20.1 s against 13.5 s. bfloat16 keeps float32's exponent range,
    so it cannot overflow to NaN the way float16 does.

    Args:
        device: a torch device string ("cpu", "cuda", "cuda:1", "mps").
        requested: "auto"/None or a dtype name (aliases such as "fp16" accepted).
        cuda_bf16: whether the CUDA device supports bfloat16 (compute capability 8.0+).
        cpu_bf16: the CPU's bfloat16 support, one of :data:`CPU_BF16_KINDS`.
        model_dtype: the half precision the model was released in (the registry's ``dtype``): a "bfloat16"
            model (T5 text encoders, MMDiT/DiT) overflows float16, so a CUDA GPU without bfloat16 runs it in
            float32.

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
        if model_dtype == "bfloat16":
            return DtypeChoice("float32", "CUDA GPU without bfloat16 support, and this model overflows float16")
        return DtypeChoice("float16", "CUDA GPU without bfloat16 support")
    if kind == "mps":
        return DtypeChoice("float32", "MPS: half precision is unreliable there")
    if cpu_bf16 == "amx":  # measured: SD-Turbo UNet step 3.62 s fp32 -> 1.08 s bf16, VAE decode 12.57 -> 2.44 s
        return DtypeChoice("bfloat16", "CPU with AMX bfloat16 tiles, where bfloat16 measured 3-5x faster than "
                                       "float32; --dtype float32 for full precision")
    if cpu_bf16 == "native":  # measured: SD-Turbo UNet step 13.5 s fp32 -> 20.1 s bf16 with AVX-512-BF16
        return DtypeChoice("float32", "CPU with bfloat16 instructions, where bfloat16 measured slower than "
                                      "float32 (--dtype bfloat16 to use it)")
    if cpu_bf16 == "avx512":  # measured: SD-Turbo 512x512 image 23.1 s fp32 -> 60.5 s bf16 (BENCHMARKS.md)
        return DtypeChoice("float32", "CPU with AVX-512 but no bfloat16 instructions: bf16 is slower there")
    return DtypeChoice("float32", "CPU without AVX-512 or bfloat16 instructions")


BF16_MIN_PSNR_DB = 30.0
# The (prompt, seed) pairs the rule is judged on, worst PSNR of all of them (bench.suite and the slow test)
BF16_QUALITY_PAIRS = tuple((["a red circle on a blue background", "a small yellow square in the top left corner",
                             "green triangle, white background", "a large purple circle"][seed % 4], seed)
                           for seed in range(8))


def bf16_quality_holds(psnr_db: float, has_nan: bool, *, minimum_db: float = BF16_MIN_PSNR_DB) -> bool:
    """The quality rule for making bfloat16 the automatic CPU dtype: the bf16 image against the float32 one
    (same seed) has a PSNR of at least ``minimum_db`` dB and holds no NaN."""
    return not has_nan and psnr_db == psnr_db and psnr_db >= minimum_db


def psnr_db(reference, test) -> float:
    """Peak signal-to-noise ratio of ``test`` against ``reference``, dB: arrays (or tensors) of the same
    shape with values in [0, 1]. Identical images give ``inf``; NaN anywhere gives NaN."""
    import numpy as np

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return float("inf")
    return 10 * float(np.log10(1.0 / mse))


def bf16_kind_from_flags(flags: set[str] | frozenset[str]) -> str | None:
    """Classify CPU flags (as in ``/proc/cpuinfo``) into one of :data:`CPU_BF16_KINDS`."""
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "native"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of the first CPU in ``cpuinfo`` (empty when it cannot be read: not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_kind() -> str | None:
    """This CPU's bfloat16 support (:data:`CPU_BF16_KINDS`): /proc/cpuinfo flags, else torch's own probes."""
    flags = cpu_flags()
    if flags:
        return bf16_kind_from_flags(flags)
    try:
        import torch

        if torch.cpu._is_amx_tile_supported():
            return "amx"
        if torch.cpu._is_avx512_bf16_supported():
            return "native"
        return "avx512" if torch.cpu._is_avx512_supported() else None
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        return None


def check_device_name(requested: str | None, source: str = "--device") -> str:
    """The device name, lower-cased, if it is spelled like one (auto, cpu, cuda, cuda:N, mps; None means auto);
    whether the machine has it is :func:`pick_device`'s question.

    Raises:
        UsageError: any other text; the message names ``source`` (``--device``, ``DALLE_DEVICE``, ...).
    """
    name = (requested or "auto").lower()
    kind, _, index = name.partition(":")
    if name != "auto" and (kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit())):
        raise UsageError(f"unknown {source} '{requested}'; use auto, cpu, cuda, cuda:N or mps")
    return name


def pick_device(requested: str | None, *, cuda: bool, mps: bool, cuda_count: int = 1) -> str:
    """Pure device policy: ``auto`` picks CUDA, then MPS, then CPU.

    Raises:
        DeviceUnavailableError: a requested device that this machine does not have.
        UsageError: an unknown device name.
    """
    name = check_device_name(requested)
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    kind, _, index = name.partition(":")
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


def resolve_dtype(device: str, requested: str | None = None, model_dtype: str | None = None) -> DtypeChoice:
    """:func:`choose_dtype` with the hardware facts filled in from torch and the CPU flags.

    Args:
        model_dtype: the registry's ``dtype`` for the model, when it has an entry.
    """
    import torch

    cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    cpu_bf16 = cpu_bf16_kind() if device == "cpu" else None
    return choose_dtype(device, requested, cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16, model_dtype=model_dtype)


def float32_weight_bytes(folder) -> int | None:
    """Bytes the weights of a pipeline folder take in float32, from the safetensors headers (no tensor is
    read): elements x 4 over every tensor of every component, one variant per component. None when the
    folder has no readable safetensors."""
    import re
    from math import prod
    from pathlib import Path

    from dallecli.errors import DalleError
    from dallecli.weightfiles import read_header

    groups: dict[str, dict[str, list[Path]]] = {}
    for path in sorted(Path(folder).rglob("*.safetensors")):
        parts = path.relative_to(folder).parts
        if len(parts) != 2:  # root single-file checkpoints are not loaded
            continue
        pieces = path.name.split(".")
        variant = re.sub(r"-\d{5}-of-\d{5}$", "", pieces[-2]) if len(pieces) > 2 else ""
        groups.setdefault(parts[0], {}).setdefault(variant, []).append(path)
    total = 0
    for variants in groups.values():
        for path in variants.get("", next(iter(variants.values()))):
            try:  # not a complete safetensors file (a pickle, a pointer, a truncated download...): no estimate
                header = read_header(path)
                total += sum(4 * prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
            except (OSError, DalleError, KeyError, TypeError, AttributeError):
                return None
    return total or None
