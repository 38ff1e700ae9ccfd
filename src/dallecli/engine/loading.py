"""Load a diffusers pipeline from safetensors only, and keep it loaded for the life of the process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dallecli.engine.failures import out_of_memory
from dallecli.weightfiles import verify_folder
from dallecli.store.download import SKIPPED_COMPONENTS, variant_of
from dallecli.errors import ModelNotFoundError, UnsafeWeightsError, UsageError, first_line

_CACHE: dict[tuple, object] = {}


def quiet_libraries() -> None:
    """Silence diffusers/transformers warnings and progress bars: the CLI reports what matters itself."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


GENERATION_DEFAULTS_KEY = "generation_defaults"  # in a model folder's training.json (dalle finetune --full)


def recorded_defaults(folder: Path) -> dict | None:
    """The generation defaults a model folder carries in its ``training.json`` (``"generation_defaults"``:
    ``{"steps", "guidance", "width", "height"}``, written by ``dalle finetune --full`` from its base model), or
    None when it carries none or they are not positive numbers (a damaged file falls back to the family's)."""
    try:
        record = json.loads((Path(folder) / "training.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = record.get(GENERATION_DEFAULTS_KEY) if isinstance(record, dict) else None
    if not isinstance(found, dict):
        return None
    defaults = {}
    for name, kind in (("steps", int), ("guidance", float), ("width", int), ("height", int)):
        value = found.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < (0 if name == "guidance" else 1):
            return None
        if kind is int and value != int(value):
            return None
        defaults[name] = kind(value)
    return defaults


def _weight_variants(component: Path) -> set[str | None]:
    """The weights variants present in a component folder: None for the plain files, "fp16" for
    ``*.fp16.safetensors`` (shards included)."""
    return {variant_of(p.name) for p in component.glob("*.safetensors")}


def choose_variant(folder: Path, dtype: str, preferred: str | None = "fp16") -> str | None:
    """The ``variant`` to pass to ``from_pretrained`` for a pipeline folder, decided by the files present.

    diffusers loads ``variant`` files for the components that have them and the plain files for the rest, but
    without a variant it insists on the plain files everywhere. So: float32 takes the plain files when every
    component has them (full precision, no cast); otherwise, and in half precision, the ``preferred`` variant
    (or the only one present) is loaded and cast to ``dtype``. A download of only ``*.fp16.safetensors`` thus
    loads on the CPU in float32 too.

    Args:
        folder: a diffusers pipeline folder.
        dtype: "float32", "float16" or "bfloat16".
        preferred: the variant to use when present (the registry's, default "fp16").

    Returns:
        A variant name, or None for the plain files.
    """
    found = [_weight_variants(c) for c in folder.iterdir() if c.is_dir()] if folder.is_dir() else []
    found = [v for v in found if v]
    variants = {name for names in found for name in names if name}
    if not variants:
        return None
    if dtype == "float32" and all(None in names for names in found):
        return None
    if preferred in variants:
        return preferred
    return sorted(variants)[0]


def pretrained_kwargs(folder: Path, dtype: str, preferred_variant: str | None = "fp16") -> dict:
    """Keyword arguments for ``DiffusionPipeline.from_pretrained(folder, ...)``: safetensors only, offline,
    ``dtype``, the variant :func:`choose_variant` picks, and None for the components dalle never loads
    (:data:`SKIPPED_COMPONENTS`) when their folders are absent."""
    kwargs = {"use_safetensors": True, "local_files_only": True, **_dtype_kwargs(dtype)}
    variant = choose_variant(folder, dtype, preferred_variant)
    if variant:
        kwargs["variant"] = variant
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    for name in SKIPPED_COMPONENTS:
        if name in index and not (folder / name).is_dir():
            kwargs[name] = None
    if "requires_safety_checker" in index:
        kwargs["requires_safety_checker"] = False
    return kwargs


def _dtype_kwargs(dtype: str) -> dict:
    """``from_pretrained``'s dtype keyword for ``dtype`` (a torch dtype name): diffusers renamed
    ``torch_dtype`` to ``dtype`` (the old name warns); older releases know only ``torch_dtype``."""
    import torch
    from diffusers.pipelines import pipeline_utils

    return {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": getattr(torch, dtype)}


def load_fresh_pipeline(folder: Path, dtype: str, variant: str | None = "fp16", *, cpu_threads: bool = False):
    """Load the pipeline in ``folder`` on the CPU in ``dtype``, uncached: a copy of its own that the caller may
    change (``dalle finetune`` puts adapters on it and trains it). :func:`load_pipeline` is this plus the cache
    and the device.

    Every weights file is checked by content first (:func:`dallecli.weightfiles.verify_folder`), then
    ``DiffusionPipeline.from_pretrained(..., use_safetensors=True, local_files_only=True)`` loads it; remote code
    is never trusted. Weights are materialised once, straight in ``dtype`` (diffusers' ``low_cpu_mem_usage``
    path through accelerate: no random initialisation, no second copy). Progress bars are off.

    Args:
        folder: a diffusers pipeline folder (``model_index.json`` + component folders), or a single-file
            ``.safetensors`` checkpoint (:func:`dallecli.engine.single_file.load_single_file`).
        dtype: "float32", "float16" or "bfloat16".
        variant: the preferred weights variant such as "fp16" (:func:`choose_variant` decides from the files).
        cpu_threads: set torch's threads (:func:`dallecli.engine.threads.configure_threads`) once the files are
            checked, before the weights load (the engine running on the CPU).

    Returns:
        The pipeline, its weights in CPU memory.

    Raises:
        UnsafeWeightsError: pickle-only components or pickles disguised as safetensors.
        CorruptWeightsError: truncated or LFS-pointer weights.
        ModelNotFoundError: not a pipeline folder, or diffusers cannot load it.
    """
    single_file = folder.is_file()  # an A1111/Civitai checkpoint: engine/single_file.py
    if not single_file and not (folder / "model_index.json").exists():
        raise ModelNotFoundError(f"{folder} has no model_index.json; it is not a diffusers pipeline folder")
    if not single_file:
        verify_folder(folder)
    quiet_libraries()
    from diffusers import DiffusionPipeline

    if cpu_threads:
        from dallecli.engine.threads import configure_threads

        configure_threads()
    try:
        if single_file:
            from dallecli.engine.single_file import load_single_file

            pipe = load_single_file(folder, dtype)
        else:
            pipe = DiffusionPipeline.from_pretrained(folder, **pretrained_kwargs(folder, dtype, variant))
    except (EnvironmentError, ValueError) as exc:
        message = first_line(exc)
        if "safetensors" in message.lower() and "not found" in message.lower():
            raise UnsafeWeightsError(f"{folder} lacks .safetensors weights for a component: {message}") from exc
        raise ModelNotFoundError(f"cannot load the pipeline in {folder}: {message}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(folder: Path, device: str, dtype: str, variant: str | None = "fp16", *, offload: bool = False):
    """Load (or reuse) the pipeline in ``folder`` on ``device`` in ``dtype``.

    The loading is :func:`load_fresh_pipeline` (weights checked by content, safetensors only, remote code never
    trusted, weights materialised once straight in ``dtype``). On the CPU, torch's threads follow
    :func:`dallecli.engine.threads.configure_threads` (one per physical core). The result is cached
    in-process keyed by (folder, device, dtype, variant, offload).

    Args:
        folder: a diffusers pipeline folder (``model_index.json`` + component folders), or a single-file
            ``.safetensors`` checkpoint (:func:`dallecli.engine.single_file.load_single_file`).
        device: torch device string ("cpu", "cuda", "mps", ...).
        dtype: "float32", "float16" or "bfloat16".
        variant: the preferred weights variant such as "fp16" (:func:`choose_variant` decides from the files).
        offload: CUDA only: keep each model in CPU memory until its turn (``enable_model_cpu_offload``)
            instead of moving the whole pipeline to the GPU.

    Raises:
        UnsafeWeightsError: pickle-only components or pickles disguised as safetensors.
        CorruptWeightsError: truncated or LFS-pointer weights.
        ModelNotFoundError: not a pipeline folder, or diffusers cannot load it.
        OutOfMemoryError: the weights do not fit on the device (any allocator's words:
            :func:`dallecli.engine.failures.out_of_memory`).
    """
    offload = offload and device.startswith("cuda")
    key = (str(folder.resolve()), device, dtype, variant, offload)
    if key in _CACHE:
        return _CACHE[key]
    pipe = load_fresh_pipeline(folder, dtype, variant, cpu_threads=device == "cpu")
    with out_of_memory(f"the model does not fit in {device} memory; try --low-memory or a smaller model"):
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe = pipe.to(device)
    if device == "cpu":
        vae_channels_last(getattr(pipe, "vae", None))
    _CACHE[key] = pipe
    return pipe


def vae_channels_last(vae) -> None:
    """Lay an ``AutoencoderKL``'s weights out channels-last (NHWC) in place, for the CPU: oneDNN's convolutions
    then keep their activations NHWC from the first layer on, without reordering between layers. Measured on
    the SD VAE decoding (1, 4, 64, 64) latents on a 2-core Xeon (``python -m bench.levers``, BENCHMARKS.md):
    12.57 -> 11.40 s in float32 (79 dB PSNR against NCHW: rounding only) and 5.85 -> 2.44 s in bfloat16. The
    UNet stays NCHW: channels-last made its step slower there (3.62 -> 4.05 s). None or another VAE class (not
    measured): left as it is."""
    if type(vae).__name__ == "AutoencoderKL":
        import torch

        vae.to(memory_format=torch.channels_last)


def _config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def check_vae_fits(model_folder: Path, vae_folder: Path, vae_name: str, *, model_family: str | None = None,
                   vae_family: str | None = None) -> None:
    """Refuse, from configs alone, a ``--vae`` made for another latent space than the model's own VAE: other
    latent channels (SD's 4 against SD 3/FLUX's 16), another ``scaling_factor`` between two AutoencoderKL (SD
    0.18215 against SDXL 0.13025: a public report of washed-out images), or a registry VAE of another family.

    Args:
        model_folder: the pipeline folder (its ``vae/config.json`` is the reference; absent for single files).
        vae_folder: the replacement VAE's folder (``config.json``).
        vae_name: what the user typed, for the message.
        model_family, vae_family: registry families when known ("stable-diffusion", "sdxl", ...).

    Raises:
        UsageError: naming both values.
    """
    vae = _config(vae_folder / "config.json")
    own = _config(model_folder / "vae" / "config.json") if model_folder.is_dir() else {}
    if model_family and vae_family and model_family != vae_family:
        raise UsageError(f"--vae {vae_name} is made for {vae_family} models; this model is {model_family}")
    channels = (vae.get("latent_channels"), own.get("latent_channels"))
    if None not in channels and channels[0] != channels[1]:
        raise UsageError(f"--vae {vae_name} works on {channels[0]}-channel latents; this model's are "
                         f"{channels[1]}-channel (a VAE for another model family)")
    if vae.get("_class_name") == own.get("_class_name") == "AutoencoderKL":
        scales = (vae.get("scaling_factor", 0.18215), own.get("scaling_factor", 0.18215))
        if abs(scales[0] - scales[1]) > 1e-6:
            raise UsageError(f"--vae {vae_name} scales latents by {scales[0]:g}, this model's VAE by {scales[1]:g}: "
                             "a VAE for another model family (images would come out washed out or noisy)")


def load_vae(folder: Path, device: str, dtype: str):
    """Load (or reuse) the VAE in ``folder`` (``config.json`` + safetensors: ``AutoencoderTiny`` or
    ``AutoencoderKL``) on ``device`` in ``dtype``; cached like :func:`load_pipeline`.

    Raises:
        UnsafeWeightsError, CorruptWeightsError: as :func:`dallecli.weightfiles.verify_folder`.
        ModelNotFoundError: not a VAE folder diffusers can load.
    """
    key = ("vae", str(folder.resolve()), device, dtype)
    if key in _CACHE:
        return _CACHE[key]
    verify_folder(folder)
    quiet_libraries()
    import diffusers

    try:
        class_name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{folder}: unreadable config.json ({exc})") from exc
    if class_name not in ("AutoencoderTiny", "AutoencoderKL"):
        raise ModelNotFoundError(f"{folder} holds a {class_name}, not a VAE (AutoencoderTiny or AutoencoderKL)")
    try:
        vae = getattr(diffusers, class_name).from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                             **_dtype_kwargs(dtype))
    except (EnvironmentError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load the VAE in {folder}: {first_line(exc)}") from exc
    vae = vae.to(device).eval()
    if device == "cpu":
        vae_channels_last(vae)
    _CACHE[key] = vae
    return vae


def derive_pipeline(cls, pipe, **components):
    """``cls.from_pipe(pipe, **components)`` in ``pipe``'s own dtype: a pipeline of class ``cls`` sharing
    ``pipe``'s component objects (no weights copied). Without a dtype, diffusers' ``from_pipe`` casts every
    component to float32, in place, so the loaded pipeline itself would turn float32 (a bfloat16 SD-Turbo UNet
    step went from 1.2 s to 3.9 s after ``--vae tiny``)."""
    return cls.from_pipe(pipe, **components, **_dtype_kwargs(str(pipe.dtype).removeprefix("torch.")))


def with_vae(pipe, vae, key: str):
    """A pipeline sharing every component of ``pipe`` except its VAE (diffusers' ``from_pipe``: no weights
    are copied), cached under ``key``; ``pipe`` itself is not changed.

    Raises:
        UsageError: the VAE's latent channels differ from the pipeline's (it cannot decode these latents).
    """
    from dallecli.errors import UsageError

    cache_key = ("with-vae", id(pipe), key)
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    ours = getattr(pipe.vae.config, "latent_channels", None)
    theirs = getattr(vae.config, "latent_channels", None)
    if ours != theirs:
        raise UsageError(f"--vae {key}: it decodes {theirs}-channel latents, this model makes {ours}-channel ones")
    derived = derive_pipeline(type(pipe), pipe, vae=vae)
    derived.set_progress_bar_config(disable=True)
    _CACHE[cache_key] = derived
    return derived


def clear_cache() -> None:
    """Forget every loaded pipeline (tests, or to free memory)."""
    _CACHE.clear()


def forget(folder: Path) -> None:
    """Drop the pipelines loaded from ``folder`` (any device, dtype or variant) and those derived from them
    (:func:`with_vae`) from the cache, so that their memory is freed once no one else holds them (``dalle serve``
    unloading an idle model)."""
    name = str(Path(folder).resolve())
    dropped = {id(_CACHE.pop(key)) for key in [k for k in _CACHE if k[0] == name]}
    for key in [k for k in _CACHE if k[0] == "with-vae" and k[1] in dropped]:
        _CACHE.pop(key, None)
