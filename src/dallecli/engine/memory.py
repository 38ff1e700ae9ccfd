"""Low-memory mode: when to use it (a pure decision) and what it changes in a loaded pipeline.

``--low-memory`` trades speed for memory: the VAE decodes large images in tiles, and on CUDA each model sits in
CPU memory until its turn (model CPU offload). Without the flag the engine turns it on by itself when the
estimate of what a pass needs exceeds the free memory; the CLI says so on stderr.

Attention slicing is left out on the CPU and CUDA: diffusers' sliced processor replaces PyTorch's
``scaled_dot_product_attention``, whose kernels already never hold the full attention matrix, with one that
does, slice by slice. Measured on the CPU (peak memory above the loaded model, one image; BENCHMARKS.md): the
embedded model at 1024x1024, 4.44 GB and 323 s sliced against 0.71 GB and 70 s without; the SD-Turbo
architecture at 1024x1024, 4.92 GB and 182 s against 4.57 GB and 142 s. It stays for MPS, where diffusers
recommends it for machines with little unified memory.
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
                   guidance: bool, scale: float = 1.0) -> int:
    """A rough upper estimate of the memory one pass needs, bytes: weights in ``dtype`` plus activations.

    Args:
        weight_bytes_fp32: the model's weights in float32, bytes.
        dtype: "float32", "float16" or "bfloat16".
        width, height: image size, pixels.
        images: images in the pass (batch size).
        guidance: classifier-free guidance on (doubles the UNet batch).
        scale: the model's activations against SD's (:func:`activation_scale`).
    """
    width_factor = DTYPE_BYTES.get(dtype, 4) / 4
    weights = weight_bytes_fp32 * width_factor
    return int(weights + _activations(dtype, width, height, images, guidance, scale))


def _activations(dtype: str, width: int, height: int, images: int, guidance: bool, scale: float) -> float:
    width_factor = DTYPE_BYTES.get(dtype, 4) / 4
    return ACTIVATION_BYTES_512 * (width * height) / 512**2 * images * (2 if guidance else 1) * width_factor * scale


# The share of a pass's activations in the VAE decoder (full-resolution feature maps), which VAE tiling bounds;
# measured on the SD-Turbo architecture at 1024x1024: 4.6 GB above the loaded model, of it about 1 GB the UNet's.
VAE_SHARE = 0.75


def activation_scale(model_folder) -> float:
    """How a model's activations compare with SD's, from its UNet's first block width (SD: 320; the embedded
    model: 32): 1.0 for transformers and anything unread. Measured: the embedded model at 1024x1024 needs 0.71 GB
    above its weights; the SD-sized estimate said 12.9 GB, scaled 1.3 GB."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(model_folder) / "unet" / "config.json").read_text(encoding="utf-8"))
        return min(1.0, max(0.05, float(config["block_out_channels"][0]) / 320))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 1.0


def low_memory_floor_bytes(weight_bytes_fp32: int, dtype: str, width: int, height: int, images: int,
                           guidance: bool, scale: float = 1.0, *, tiles: bool = True) -> int:
    """What a pass needs at least with every low-memory technique on, bytes: the weights, the UNet's activations,
    and, with VAE tiling (above :data:`TILING_MIN_PIXELS`, when the VAE ``tiles``: :func:`vae_can_tile`), one
    512x512 tile's decoder instead of the image's."""
    weights = weight_bytes_fp32 * DTYPE_BYTES.get(dtype, 4) / 4
    full = _activations(dtype, width, height, images, guidance, scale)
    if width * height <= TILING_MIN_PIXELS or not tiles:
        return int(weights + full)
    tile = _activations(dtype, 512, 512, 1, False, scale) * VAE_SHARE
    return int(weights + full * (1 - VAE_SHARE) + tile)


def check_feasible(floor: int, available: int | None, device: str, width: int, height: int, images: int) -> None:
    """Refuse a pass that even low-memory mode cannot fit: its floor (:func:`low_memory_floor_bytes`) above the free
    memory. (Without the refusal such a pass computes for minutes, then runs out of memory.)

    Raises:
        OutOfMemoryError: with the figures (exit 3), before the model loads.
    """
    if available is None or floor <= available:
        return
    from dallecli.errors import OutOfMemoryError

    raise OutOfMemoryError(f"{images} image(s) of {width}x{height} need about {floor / 1000**3:.1f} GB even in "
                           f"low-memory mode and {available / 1000**3:.1f} GB is free on {device}; nothing was "
                           "started. Lower the size (--width/--height) or -n/--batch-size")


def techniques_for(device: str, width: int, height: int) -> tuple[str, ...]:
    """What low-memory mode switches on for this device and image size."""
    chosen = ["attention slicing"] if device.startswith("mps") else []
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


def vae_can_tile(model_folder) -> bool:
    """:func:`_tiling_fits` from the model's ``vae/config.json`` alone (before anything loads); True when unread."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(model_folder) / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    if config.get("_class_name") != "AutoencoderTiny":
        return True
    return _tiny_decodes_8x(config.get("upsampling_scaling_factor", 2),
                            config.get("decoder_block_out_channels", (64, 64, 64, 64)), config.get("out_channels", 3))


def _tiling_fits(vae) -> bool:
    """Whether diffusers' tiled decode works for ``vae``: ``AutoencoderTiny`` tiles assume an 8x decoder
    (``spatial_scale_factor = 2**out_channels``), so a tiny VAE that upsamples otherwise (the embedded model's
    decodes 4x) fails at the first tile seam; it is decoded whole instead."""
    if type(vae).__name__ != "AutoencoderTiny":
        return True
    config = vae.config
    return _tiny_decodes_8x(config.upsampling_scaling_factor, config.decoder_block_out_channels, config.out_channels)


def _tiny_decodes_8x(upsampling: int, decoder_blocks, out_channels: int) -> bool:
    """Whether a tiny VAE's real upscaling (one upsampling per decoder block but the last) is the
    ``2**out_channels`` that diffusers' ``AutoencoderTiny`` tiling assumes."""
    return upsampling ** (len(decoder_blocks) - 1) == 2 ** out_channels


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
    if vae is not None and hasattr(vae, "enable_tiling") and _tiling_fits(vae):
        vae.enable_tiling() if tiling else vae.disable_tiling()
    pipe._dalle_memory_state = state
