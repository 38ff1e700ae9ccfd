"""Apply LoRA files to a loaded pipeline: diffusers/PEFT and kohya/A1111 key layouts, with scales.

``--lora`` takes a file path or the name of a registry LoRA downloaded with ``dalle download NAME``
(:func:`dallecli.store.resolve.resolve_lora`). Each file is checked by content first (safetensors only, exactly
as long as its header says), read with ``safetensors.torch.load_file`` (never a pickle: diffusers' own file
loading falls back to ``torch.load`` when it cannot read a file as safetensors), and its cross-attention width
compared with the model's (an SDXL LoRA on an SD 1.x model is refused in one line, before anything loads).
The tensors then go to diffusers' ``pipe.load_lora_weights(state_dict, adapter_name=...)``, which converts
kohya keys (``lora_unet_...``, ``lora_te_...``, ``.alpha``) from a dict exactly as from a file;
``pipe.set_adapters`` then gives every LoRA its scale. After loading, the LoRA layers that now exist in the model are counted: a file that matched no layer
is an error (it would otherwise load silently and change nothing). Scale 0 adds exactly zero, so the pixels
equal those without the LoRA.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from dallecli.engine.request import LoraSpec
from dallecli.errors import LoraError, LoraMismatchError, UsageError, first_line

ADAPTER_PREFIX = "dalle_lora_"
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
# The width of the text embeddings a denoiser attends to, by family (``unet.config.cross_attention_dim``).
CROSS_ATTENTION_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "the SDXL refiner", 2048: "SDXL",
                            4096: "SD 3 or FLUX"}
# The down (A) matrix of a UNet cross-attention key or value projection, whose input is the text width:
# diffusers ``...attn2.to_k.lora.down.weight`` / ``...attn2.processor.to_k_lora.down.weight``, PEFT
# ``...attn2.to_k.lora_A.weight``, kohya ``lora_unet_..._attn2_to_k.lora_down.weight`` (either block naming).
_CROSS_KV_DOWN = re.compile(r"attn2[._](?:processor[._])?to_[kv](?:_lora)?[._](?:lora[._]down|lora_down|lora_A)[._]")


def parse_lora(text: str) -> LoraSpec:
    """``"style.safetensors:0.8"`` -> ``LoraSpec("style.safetensors", 0.8)``; no ``:SCALE`` means 1.0. The path
    may also be a registry LoRA name (``lcm-lora-sdv1-5:0.5``), resolved when the LoRA is applied.

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
        raise UsageError(f"--lora {text!r}: give a file path or a registry LoRA name (PATH[:SCALE])")
    if not math.isfinite(scale):
        raise UsageError(f"--lora {text!r}: the scale must be a finite number")
    return LoraSpec(path, scale)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lora(path: Path) -> dict:
    """The tensors of a LoRA file, read as safetensors only, after the content check.

    A diffusers ``lora_adapter_metadata`` header (``lora_alpha`` and ``alpha_pattern`` per component, written
    by ``save_lora_weights``) is folded into the ``lora_B`` weights: diffusers reads that header only when it
    opens the file itself, and a dict without it is applied with alpha = rank.

    Returns:
        ``{key: tensor}`` on the CPU.

    Raises:
        UnsafeWeightsError: the content is a pickle (whatever the file is called).
        CorruptWeightsError: truncated, trailing bytes, or not safetensors.
        LoraError: an unreadable ``lora_adapter_metadata`` header.
    """
    from safetensors.torch import load_file

    from dallecli.weightfiles import read_header

    stored = read_header(path).get("__metadata__")
    state = load_file(str(path), device="cpu")
    raw = stored.get("lora_adapter_metadata") if isinstance(stored, dict) else None
    if not raw:
        return state
    try:
        metadata = json.loads(raw)
    except ValueError:
        raise LoraError(f"LoRA {path.name}: its lora_adapter_metadata header is not JSON") from None
    if not isinstance(metadata, dict):
        raise LoraError(f"LoRA {path.name}: its lora_adapter_metadata header is not a JSON object")
    return _fold_alpha(state, metadata)


def _fold_alpha(state: dict, metadata: dict) -> dict:
    """Scale every ``lora_B`` by its module's alpha / rank (alpha / sqrt(rank) with rsLoRA), as PEFT would."""
    from peft.utils.other import get_pattern_key

    folded = dict(state)
    for key, tensor in state.items():
        if ".lora_B." not in key:
            continue
        module = key.split(".lora_B.")[0]
        prefix, _, inner = module.partition(".")
        if f"{prefix}.lora_alpha" not in metadata:  # a single model's file: keys and metadata unprefixed
            prefix, inner = "", module
        get = (lambda name: metadata.get(f"{prefix}.{name}")) if prefix else metadata.get
        alpha = get("lora_alpha")
        if alpha is None:
            continue
        pattern = get("alpha_pattern") or {}
        if pattern:
            alpha = pattern.get(get_pattern_key(list(pattern), inner), alpha)
        rank = tensor.shape[1]  # lora_B: (out, rank, ...)
        scale = float(alpha) / (math.sqrt(rank) if get("use_rslora") else rank)
        if scale != 1.0:
            folded[key] = (tensor.float() * scale).to(tensor.dtype)
    return folded


def family_name(width: int) -> str:
    """``768`` -> ``"SD 1.x (cross-attention 768)"``; a width no known family has -> ``"a model with
    cross-attention width W"``."""
    family = CROSS_ATTENTION_FAMILIES.get(width)
    return f"{family} (cross-attention {width})" if family else f"a model with cross-attention width {width}"


def lora_cross_attention_width(state: dict) -> int | None:
    """The text width a UNet LoRA was trained against: the input width of its cross-attention key/value down
    (A) matrices (``(rank, width)``), the most common one; None when the LoRA has no such layer."""
    from collections import Counter

    widths = Counter(int(tensor.shape[1]) for key, tensor in state.items()
                     if getattr(tensor, "ndim", 0) >= 2 and _CROSS_KV_DOWN.search(key))
    return widths.most_common(1)[0][0] if widths else None


def check_family(pipe, state: dict, name: str) -> None:
    """Refuse, in one line, a LoRA made for another base family (decided from tensor shapes, before loading).

    Args:
        pipe: the loaded pipeline (its ``unet.config.cross_attention_dim``, or a transformer).
        state: the LoRA's tensors (:func:`read_lora`).
        name: the file name shown in the message.

    Raises:
        LoraMismatchError: e.g. "LoRA x.safetensors was made for SDXL (cross-attention 2048); this model is SD 1.x
            (768)" (a usage error, exit code 2).
    """
    width = lora_cross_attention_width(state)
    if width is None:
        return
    made_for = f"LoRA {name} was made for {family_name(width)}"
    unet = getattr(pipe, "unet", None)
    if unet is None:
        if getattr(pipe, "transformer", None) is not None:
            raise LoraMismatchError(f"{made_for}, a UNet model; this model is {type(pipe).__name__}, a transformer; "
                            "use a LoRA made for it")
        return
    own = getattr(unet.config, "cross_attention_dim", None)
    if isinstance(own, int) and own != width:
        theirs = CROSS_ATTENTION_FAMILIES.get(own)
        raise LoraMismatchError(f"{made_for}; this model is {theirs or 'a model'} ({own}); use a LoRA made for "
                                f"{theirs or 'it'}")


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


def apply_loras(pipe, loras: Sequence[LoraSpec], cache_dir: Path | None = None) -> list[dict]:
    """Replace whatever LoRAs ``pipe`` holds with ``loras``, each at its scale.

    Args:
        pipe: a diffusers pipeline with LoRA support (``load_lora_weights``).
        loras: files (or registry LoRA names) and scales, in order (may be empty: unloads everything).
        cache_dir: the HF cache where registry LoRAs were downloaded (default: ``HF_HUB_CACHE``).

    Returns:
        One dict per LoRA for the image metadata: ``path``, ``name``, ``registry`` (the registry name it was
        given by, which ``--from`` replays, or None), ``scale``, ``sha256``, ``layers`` and ``tensors``
        applied, ``file_tensors`` (weight tensors in the file).

    Raises:
        LoraError: a file that is missing, made for another model family, that the pipeline cannot take, or
            that matches 0 layers.
        ModelNotFoundError: a registry LoRA that is not downloaded.
        UnsafeWeightsError, CorruptWeightsError: the file is a pickle, truncated, too long or not safetensors.
    """
    from dallecli.store.resolve import resolve_lora

    remove_loras(pipe)
    if not loras:
        return []
    if not hasattr(pipe, "load_lora_weights"):
        raise LoraError(f"{type(pipe).__name__} does not support LoRA files")
    applied, names = [], []
    try:
        for index, spec in enumerate(loras):
            path, registry = resolve_lora(spec.path, cache_dir)
            if not path.is_file():
                raise LoraError(f"LoRA file {path} not found")
            state = read_lora(path)
            check_family(pipe, state, path.name)
            file_tensors = sum(1 for key in state if not key.endswith(".alpha"))
            adapter = f"{ADAPTER_PREFIX}{index}"
            try:
                with _quiet_diffusers():  # its "unsuccessful" log line would repeat our own message
                    pipe.load_lora_weights(state, adapter_name=adapter)
            except (ValueError, KeyError, RuntimeError, IndexError) as exc:
                message = first_line(exc)
                if "not found in the base model" in message or "no lora" in message.lower():
                    raise LoraError(f"LoRA {path.name} matched 0 layers of this model (its keys name layers the "
                                    "model does not have); it was made for another model") from exc
                raise LoraError(f"cannot apply LoRA {path.name}: {message}") from exc
            layers, tensors = adapter_layers(pipe, adapter)
            if layers == 0:
                raise LoraError(f"LoRA {path.name} matched 0 layers of this model (its keys name layers the "
                                "model does not have); it was made for another model")
            names.append(adapter)
            applied.append({"path": str(path), "name": registry or path.stem, "registry": registry,
                            "scale": float(spec.scale), "sha256": _sha256(path), "layers": layers,
                            "tensors": tensors, "file_tensors": file_tensors})
        pipe.set_adapters(names, adapter_weights=[float(s.scale) for s in loras])
    except BaseException:
        remove_loras(pipe)
        raise
    return applied
