"""Low-memory mode: when to use it (a pure decision) and what it changes in a loaded pipeline.

``--low-memory`` trades speed for memory: attention is computed in slices (no full attention matrix), the VAE
decodes large images in tiles, and on CUDA each model sits in CPU memory until its turn (model CPU offload).
Without the flag the engine turns it on by itself when the estimate of what a pass needs exceeds the free
memory; the CLI says so on stderr.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Peak activations of one 512x512 image pass in float32 (UNet self-attention at 64x64 latents and the VAE
# decoder's full-resolution feature maps dominate), bytes; scaled by pixels, images and dtype width.
ACTIVATION_BYTES_512 = 1.5 * 1024**3
HEADROOM = 0.9  # use at most this share of the free memory
TILING_MIN_PIXELS = 1024 * 1024  # VAE tiling pays only for images larger than this


@dataclass(frozen=True)
class MemoryChoice:
    """Whether low-memory mode is on, and why.

    Attributes:
        low_memory: on or off.
        automatic: chosen by the engine (not by ``--low-memory``/``--no-low-memory``): the CLI reports it.
        reason: one line, e.g. "4.1 GB free, about 6.3 GB needed".
        techniques: what is switched on ("attention slicing", "VAE tiling", "model CPU offload").
    """

    low_memory: bool
    automatic: bool
    reason: str
    techniques: tuple[str, ...] = ()


def estimate_bytes(weight_bytes_fp32: int, dtype: str, width: int, height: int, images: int,
                   guidance: bool) -> int:
    """A rough upper estimate of the memory one pass needs, bytes: weights in ``dtype`` plus activations.

    Args:
        weight_bytes_fp32: the model's weights in float32, bytes.
        dtype: "float32", "float16" or "bfloat16".
        width, height: image size, pixels.
        images: images in the pass (batch size).
        guidance: classifier-free guidance on (doubles the UNet batch).
    """
    width_factor = DTYPE_BYTES.get(dtype, 4) / 4
    weights = weight_bytes_fp32 * width_factor
    activations = ACTIVATION_BYTES_512 * (width * height) / 512**2 * images * (2 if guidance else 1) * width_factor
    return int(weights + activations)


def techniques_for(device: str, width: int, height: int) -> tuple[str, ...]:
    """What low-memory mode switches on for this device and image size."""
    chosen = ["attention slicing"]
    if width * height > TILING_MIN_PIXELS:
        chosen.append("VAE tiling")
    if device.startswith("cuda"):
        chosen.append("model CPU offload")
    return tuple(chosen)


def choose_low_memory(requested: bool | None, needed: int, available: int | None, device: str = "cpu",
                      width: int = 512, height: int = 512) -> MemoryChoice:
    """Decide low-memory mode (pure).

    Args:
        requested: True/False from ``--low-memory``/``--no-low-memory``; None lets the engine decide.
        needed: estimated bytes (see :func:`estimate_bytes`).
        available: free bytes on the device (None: unknown, then the mode stays off).
        device: torch device string.
        width, height: image size, pixels (VAE tiling only above 1024x1024 pixels' worth).
    """
    techniques = techniques_for(device, width, height)
    if requested is not None:
        return MemoryChoice(requested, False, "requested with --low-memory" if requested else "requested off",
                            techniques if requested else ())
    if available is None:
        return MemoryChoice(False, False, "free memory unknown")
    reason = f"{available / 1000**3:.1f} GB free, about {needed / 1000**3:.1f} GB needed"
    if needed > available * HEADROOM:
        return MemoryChoice(True, True, reason, techniques)
    return MemoryChoice(False, False, reason)


def available_bytes(device: str, meminfo: str = "/proc/meminfo") -> int | None:
    """Free memory on ``device``, bytes: ``MemAvailable`` for the CPU (Linux), free VRAM for CUDA; None when
    unknown (MPS, other systems)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        return int(torch.cuda.mem_get_info(index)[0])
    if device != "cpu":
        return None
    try:
        with open(meminfo, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def apply_memory_mode(pipe, choice: MemoryChoice) -> None:
    """Switch attention slicing and VAE tiling on or off in ``pipe`` to match ``choice`` (cheap when nothing
    changes: the state is remembered on the pipeline). Model CPU offload is set at load time."""
    state = ("attention slicing" in choice.techniques, "VAE tiling" in choice.techniques)
    if getattr(pipe, "_dalle_memory_state", (False, False)) == state:
        return
    slicing, tiling = state
    if hasattr(pipe, "enable_attention_slicing"):
        pipe.enable_attention_slicing("auto") if slicing else pipe.disable_attention_slicing()
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling() if tiling else vae.disable_tiling()
    pipe._dalle_memory_state = state
