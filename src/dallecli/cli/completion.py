"""Shell completion of option values (Typer ``autocompletion=`` callbacks).

``dalle --install-completion`` installs the shell hook; each Tab then runs ``dalle`` with ``_DALLE_COMPLETE``
set, and these callbacks answer. They run on every Tab, so they read constants and folder names only: nothing
here imports torch, diffusers or huggingface_hub (the Hub cache is found the way huggingface_hub finds it,
from ``HF_HUB_CACHE``, ``HF_HOME`` and ``XDG_CACHE_HOME``).
"""

from __future__ import annotations

import os
from pathlib import Path

# The values --device takes besides cuda:N (one per GPU, listed when the NVIDIA driver shows them).
DEVICES = ("auto", "cpu", "cuda", "mps")
# --format; the writer's own table (dallecli.images.FORMATS) when it exists, else these.
IMAGE_FORMATS = ("png", "jpeg", "webp")


def _starting(values, incomplete: str) -> list[str]:
    return [value for value in values if value.startswith(incomplete)]


def complete_scheduler(incomplete: str) -> list[str]:
    """``--scheduler`` values that start with ``incomplete``: default and the short names (class names such as
    PNDMScheduler are accepted too, but not offered)."""
    from dallecli.engine.schedulers import SCHEDULERS

    return _starting(("default", *SCHEDULERS), incomplete)


def _cuda_devices(proc: Path = Path("/proc/driver/nvidia/gpus")) -> list[str]:
    try:
        count = sum(1 for _ in proc.iterdir())
    except OSError:
        return []
    return [f"cuda:{index}" for index in range(count)]


def complete_device(incomplete: str) -> list[str]:
    """``--device`` values that start with ``incomplete``: auto, cpu, cuda, mps and ``cuda:N`` for each GPU the
    NVIDIA driver lists (read from /proc, without torch)."""
    return _starting((*DEVICES, *_cuda_devices()), incomplete)


def complete_dtype(incomplete: str) -> list[str]:
    """``--dtype`` values that start with ``incomplete``."""
    from dallecli.engine.device import DTYPES

    return _starting(DTYPES, incomplete)


def complete_format(incomplete: str) -> list[str]:
    """``--format`` values that start with ``incomplete``: png, jpeg, webp."""
    try:
        from dallecli.images import FORMATS

        names = tuple(FORMATS)
    except ImportError:
        names = IMAGE_FORMATS
    return _starting(names, incomplete)


def complete_progress(incomplete: str) -> list[str]:
    """``--progress`` values that start with ``incomplete``."""
    from dallecli.config import PROGRESS_MODES

    return _starting(PROGRESS_MODES, incomplete)


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache as huggingface_hub resolves it (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``), without importing it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def cached_repos(cache_dir: Path | None = None) -> list[str]:
    """The ``org/name`` repo ids of the models in the Hub cache (its ``models--org--name`` folders), sorted."""
    folder = Path(cache_dir).expanduser() if cache_dir else hub_cache_dir()
    try:
        names = [entry.name for entry in folder.iterdir() if entry.name.startswith("models--") and entry.is_dir()]
    except OSError:
        return []
    return sorted(name[len("models--"):].replace("--", "/", 1) for name in names)


def model_choices(cache_dir: Path | None = None, kinds: tuple[str, ...] = ("pipeline",)) -> list[tuple[str, str]]:
    """``(name, help)`` for ``--model``: the registry's entries of ``kinds`` (alias, with "downloaded" when it
    is in the cache), then the cached repos no registry entry names."""
    from dallecli.store.registry import REGISTRY

    cached = set(cached_repos(cache_dir))
    choices = []
    for spec in REGISTRY.values():
        if spec.kind not in kinds:
            continue
        where = "embedded" if spec.repo_id is None else "downloaded" if spec.repo_id in cached else \
            f"registry, {spec.size_gb:g} GB to download"
        choices.append((spec.alias, f"{spec.family} ({where})"))
    known = {spec.repo_id for spec in REGISTRY.values()}
    choices += [(repo, "downloaded") for repo in sorted(cached - known)]
    return choices


def complete_model(ctx, incomplete: str) -> list[tuple[str, str]]:
    """``--model`` values that start with ``incomplete``: registry aliases and cached repos (in the command's
    ``--cache-dir`` when it was given before ``--model``)."""
    cache_dir = (ctx.params or {}).get("cache_dir") if ctx is not None else None
    return [(name, note) for name, note in model_choices(cache_dir) if name.startswith(incomplete)]


def complete_upscaler(ctx, incomplete: str) -> list[tuple[str, str]]:
    """``dalle upscale --model`` values: the registry's upscalers and cached repos."""
    cache_dir = (ctx.params or {}).get("cache_dir") if ctx is not None else None
    return [(name, note) for name, note in model_choices(cache_dir, ("upscaler",)) if name.startswith(incomplete)]
