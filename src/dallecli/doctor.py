"""What ``dalle doctor`` reports: versions, devices and the dtype policy's choice, cache, disk and config.

:func:`diagnose` gathers facts and returns them as one JSON-able dict; it never prints and never raises for
a broken part of the environment (a missing package, an invalid config file): the problem is recorded in
the report instead, since finding it is what the command is for.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

PACKAGES = ("torch", "diffusers", "transformers", "huggingface_hub", "safetensors", "accelerate", "peft",
            "typer", "pillow")
BUILT_IN = {"model": "shapes", "output_dir": "dalle-out", "device": "auto", "dtype": "auto", "scheduler": None,
            "progress": "auto", "backend": "torch"}
LOW_DISK_BYTES = 10 * 1000**3  # below this, a model download (2-25 GB) may not fit


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions by name (None when not installed); imports none of them."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def list_devices() -> list[dict]:
    """The compute devices torch sees (imports torch).

    Returns:
        One dict per device: ``name`` (what ``--device`` takes), ``kind``, ``label``; CUDA devices add
        ``memory_bytes`` (total VRAM, bytes), ``free_memory_bytes``, ``capability`` ("9.0") and ``bf16``
        (bfloat16 support, compute capability 8.0+).
    """
    import torch

    from dallecli.engine.threads import configure_threads

    policy = configure_threads()  # what a generation in this process would use, and why
    found = [{"name": "cpu", "kind": "cpu", "label": platform.machine() or "cpu", "threads": policy.threads,
              "threads_reason": policy.reason}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            entry = {"name": f"cuda:{index}", "kind": "cuda", "label": props.name, "memory_bytes": props.total_memory,
                     "capability": f"{props.major}.{props.minor}", "bf16": props.major >= 8}
            try:
                entry["free_memory_bytes"] = torch.cuda.mem_get_info(index)[0]
            except RuntimeError:  # a busy or broken device still gets listed
                entry["free_memory_bytes"] = None
            found.append(entry)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append({"name": "mps", "kind": "mps", "label": "Apple GPU (Metal)"})
    return found


def device_reason(device: str, devices: list[dict]) -> str:
    """Why ``auto`` picked ``device``, in words."""
    kind = device.split(":")[0]
    if kind == "cuda":
        gpu = next((d for d in devices if d["kind"] == "cuda"), None)
        label = f" ({gpu['label']}, {gpu['memory_bytes'] / 1000**3:.0f} GB)" if gpu else ""
        return f"a CUDA GPU is available{label}"
    if kind == "mps":
        return "an Apple GPU (MPS) is available and no CUDA GPU"
    return "no CUDA or MPS device found"


def folder_size(folder: Path) -> int:
    """Bytes in the files under ``folder``, symbolic links not followed or counted (0 when missing)."""
    total = 0
    for parent, _dirs, files in os.walk(folder):
        for name in files:
            try:
                stat = os.lstat(os.path.join(parent, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(parent, name)):
                total += stat.st_size
    return total


def free_space(path: Path) -> dict:
    """Free and total bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache folder downloads go to (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _defaults(config_values: dict[str, str]) -> dict[str, dict]:
    from dallecli.config import CONFIG_KEYS, env_default

    result = {}
    for key in CONFIG_KEYS:
        if env_default(key):
            result[key] = {"value": env_default(key), "source": f"environment DALLE_{key.upper()}"}
        elif key in config_values:
            result[key] = {"value": config_values[key], "source": "config file"}
        else:
            result[key] = {"value": BUILT_IN[key], "source": "built-in"}
    return result


def diagnose() -> dict:
    """Everything ``dalle doctor`` shows, as a JSON-able dict (imports torch and huggingface_hub).

    Returns:
        ``dalle``, ``python`` (version, executable), ``platform``, ``packages`` (name -> version or None),
        ``devices`` (:func:`list_devices`), ``auto`` (the device and dtype ``--device auto`` gives, each with
        its reason), ``defaults`` (each config key's value and where it comes from), ``config`` (path,
        exists, values, error), ``cache`` (HF cache path, exists, size_bytes), ``disk`` (free space where the
        cache and the output folder live), ``problems`` (sentences, empty when all is well).
    """
    from dallecli import __version__
    from dallecli.config import config_path, environment_problems, file_config
    from dallecli.errors import UsageError

    problems: list[str] = []
    report: dict = {
        "dalle": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "packages": package_versions(),
    }
    for name in ("torch", "diffusers", "transformers", "huggingface_hub"):
        if report["packages"][name] is None:
            problems.append(f"{name} is not installed; reinstall dallecli (pip install dallecli)")

    path = config_path()
    config = {"path": str(path), "exists": path.is_file(), "values": {}, "error": None}
    try:
        config["values"] = file_config()
    except UsageError as exc:
        config["error"] = str(exc)
        problems.append(str(exc))
    report["config"] = config
    report["defaults"] = _defaults(config["values"])
    problems.extend(environment_problems())  # DALLE_THREADS=abc, DALLE_DEVICE=bogus: what other commands refuse

    try:
        from dallecli.engine.device import resolve_device, resolve_dtype

        devices = list_devices()
        device = resolve_device("auto")
        choice = resolve_dtype(device, None)
        report["devices"] = devices
        reason = choice.reason
        report["auto"] = {"device": device, "device_reason": device_reason(device, devices),
                          "dtype": choice.dtype, "dtype_reason": reason}
    except ImportError as exc:
        report["devices"], report["auto"] = [], None
        problems.append(f"torch cannot be imported ({exc})")
    except UsageError:  # a bad DALLE_THREADS or DALLE_DEVICE: already among the problems
        report["devices"], report["auto"] = [], None

    try:
        cache = hf_cache_dir()
        report["cache"] = {"path": str(cache), "exists": cache.is_dir(),
                           "size_bytes": folder_size(cache) if cache.is_dir() else 0}
    except ImportError as exc:
        cache = None
        report["cache"] = None
        problems.append(f"huggingface_hub cannot be imported ({exc})")

    output = Path(report["defaults"]["output_dir"]["value"]).expanduser()
    report["disk"] = {"cache": free_space(cache) if cache else None, "output": free_space(output)}
    for where, usage in report["disk"].items():
        if usage and usage["free_bytes"] < LOW_DISK_BYTES:
            problems.append(f"only {usage['free_bytes'] / 1000**3:.1f} GB free where the {where} folder is "
                            f"({usage['path']})")
    report["problems"] = problems
    return report
