"""Paths and environment variables, read in one place.

Environment variables:
    DALLE_DEBUG=1      show tracebacks instead of one-line errors.
    DALLE_OUTPUT_DIR   default folder for images (otherwise ``./dalle-out``).
    DALLE_MODEL        default model alias, repo id or path (otherwise the embedded model).
    DALLE_DEVICE       default device (auto, cpu, cuda, cuda:N, mps).
    DALLE_DTYPE        default dtype (auto, float32, float16, bfloat16).
The Hugging Face variables (HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT) are honoured by
``huggingface_hub`` itself.
"""

from __future__ import annotations

import os
from pathlib import Path


def debug_enabled() -> bool:
    """True when ``DALLE_DEBUG`` is set to a non-empty value other than 0."""
    return os.environ.get("DALLE_DEBUG", "") not in ("", "0")


def default_output_dir() -> Path:
    """Where images go when ``--out`` is not given."""
    return Path(os.environ.get("DALLE_OUTPUT_DIR") or "dalle-out")


def env_default(name: str) -> str | None:
    """The value of ``DALLE_<NAME>`` or None."""
    return os.environ.get(f"DALLE_{name.upper()}") or None


def config_dir() -> Path:
    """The per-user configuration folder (platformdirs)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("dallecli"))
