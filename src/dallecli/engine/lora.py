"""Apply LoRA files to a loaded pipeline: diffusers/PEFT and kohya/A1111 key layouts, with scales.

Each file is checked by content first (safetensors only), then loaded with diffusers'
``pipe.load_lora_weights(path, adapter_name=...)``, which also converts kohya keys (``lora_unet_...``,
``lora_te_...``, ``.alpha``) for Stable Diffusion pipelines; ``pipe.set_adapters`` then gives every LoRA its
scale. After loading, the LoRA layers that now exist in the model are counted: a file that matched no layer
is an error (it would otherwise load silently and change nothing). Scale 0 adds exactly zero, so the pixels
equal those without the LoRA.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

from dallecli.engine.request import LoraSpec
from dallecli.errors import LoraError, UsageError

ADAPTER_PREFIX = "dalle_lora_"
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def parse_lora(text: str) -> LoraSpec:
    """``"style.safetensors:0.8"`` -> ``LoraSpec("style.safetensors", 0.8)``; no ``:SCALE`` means 1.0.

    Raises:
        UsageError: an empty path or a scale that is not a finite number.
    """
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and "/" not in tail and "\\" not in tail:
        try:
            scale = float(tail)
        except ValueError:
            raise UsageError(f"--lora {text!r}: the part after ':' must be a number (PATH[:SCALE])") from None
        path = head
    if not path.strip():
        raise UsageError(f"--lora {text!r}: give a file path (PATH[:SCALE])")
    if not math.isfinite(scale):
        raise UsageError(f"--lora {text!r}: the scale must be a finite number")
    return LoraSpec(path, scale)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_tensors(path: Path) -> int:
    """LoRA weight tensors in the file (``.alpha`` scalars and DoRA scales not counted)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return sum(1 for key in handle.keys() if not key.endswith(".alpha"))


def _quiet_diffusers():
    from contextlib import contextmanager

    from diffusers.utils import logging as diffusers_logging

    @contextmanager
    def quiet():
        previous = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
        try:
            yield
        finally:
            diffusers_logging.set_verbosity(previous)

    return quiet()


def adapter_layers(pipe, adapter: str) -> tuple[int, int]:
    """``(layers, tensors)`` of ``adapter`` now present in the pipeline's UNet/transformer/text encoders."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = tensors = 0
    for name in _COMPONENTS:
        component = getattr(pipe, name, None)
        if component is None:
            continue
        for module in component.modules():
            if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
                layers += 1
                tensors += len(list(module.lora_A[adapter].parameters())) + len(list(module.lora_B[adapter].parameters()))
    return layers, tensors


def loaded_adapters(pipe) -> list[str]:
    """Names of the LoRA adapters currently loaded in ``pipe``."""
    try:
        found = pipe.get_list_adapters()
    except (AttributeError, ValueError):
        return []
    return sorted({name for names in found.values() for name in names})


def remove_loras(pipe) -> None:
    """Unload every LoRA: the model is back to its base weights exactly."""
    if loaded_adapters(pipe):
        pipe.unload_lora_weights()


def apply_loras(pipe, loras: Sequence[LoraSpec]) -> list[dict]:
    """Replace whatever LoRAs ``pipe`` holds with ``loras``, each at its scale.

    Args:
        pipe: a diffusers pipeline with LoRA support (``load_lora_weights``).
        loras: files and scales, in order (may be empty: unloads everything).

    Returns:
        One dict per LoRA for the image metadata: ``path``, ``name``, ``scale``, ``sha256``, ``layers`` and
        ``tensors`` applied, ``file_tensors`` (weight tensors in the file).

    Raises:
        LoraError: a file that is missing, that the pipeline cannot take, or that matches 0 layers.
        UnsafeWeightsError, CorruptWeightsError: the file is a pickle, truncated or not safetensors.
    """
    from dallecli.engine.weights import verify_safetensors

    remove_loras(pipe)
    if not loras:
        return []
    if not hasattr(pipe, "load_lora_weights"):
        raise LoraError(f"{type(pipe).__name__} does not support LoRA files")
    applied, names = [], []
    try:
        for index, spec in enumerate(loras):
            path = Path(spec.path).expanduser()
            if not path.is_file():
                raise LoraError(f"LoRA file {path} not found")
            verify_safetensors(path)
            adapter = f"{ADAPTER_PREFIX}{index}"
            try:
                with _quiet_diffusers():  # its "unsuccessful" log line would repeat our own message
                    pipe.load_lora_weights(str(path), adapter_name=adapter)
            except (ValueError, KeyError, RuntimeError, IndexError) as exc:
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if "not found in the base model" in message or "no lora" in message.lower():
                    raise LoraError(f"LoRA {path.name} matched 0 layers of this model (its keys name layers the "
                                    "model does not have); it was made for another model") from exc
                raise LoraError(f"cannot apply LoRA {path.name}: {message}") from exc
            layers, tensors = adapter_layers(pipe, adapter)
            if layers == 0:
                raise LoraError(f"LoRA {path.name} matched 0 layers of this model (its keys name layers the "
                                "model does not have); it was made for another model")
            names.append(adapter)
            applied.append({"path": str(path), "name": path.stem, "scale": float(spec.scale),
                            "sha256": _sha256(path), "layers": layers, "tensors": tensors,
                            "file_tensors": _file_tensors(path)})
        pipe.set_adapters(names, adapter_weights=[float(s.scale) for s in loras])
    except BaseException:
        remove_loras(pipe)
        raise
    return applied
