"""Paths, environment variables and the config file, read in one place.

Defaults for ``generate`` and ``batch`` come, first found wins, from: the command-line flag, the environment
variable ``DALLE_<KEY>``, the config file, the built-in default. Keys (:data:`CONFIG_KEYS`):

    model        DALLE_MODEL        default model alias, repo id or path (otherwise the embedded model).
    output_dir   DALLE_OUTPUT_DIR   default folder for images (otherwise ``./dalle-out``).
    device       DALLE_DEVICE       default device (auto, cpu, cuda, cuda:N, mps).
    dtype        DALLE_DTYPE        default dtype (auto, float32, float16, bfloat16).
    scheduler    DALLE_SCHEDULER    default scheduler (euler, dpm++, ...; otherwise the model's).

Other environment variables:
    DALLE_DEBUG=1      show tracebacks instead of one-line errors.
    DALLE_CONFIG       path of the config file (otherwise ``config.toml`` in :func:`config_dir`).
The Hugging Face variables (HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT) are honoured by
``huggingface_hub`` itself.

The config file is TOML with top-level string keys, e.g.::

    model = "shapes"
    output_dir = "~/Pictures/dalle"
    scheduler = "dpm++"
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from dallecli.errors import UsageError

CONFIG_KEYS = ("model", "output_dir", "device", "dtype", "scheduler")
CONFIG_NAME = "config.toml"


def debug_enabled() -> bool:
    """True when ``DALLE_DEBUG`` is set to a non-empty value other than 0."""
    return os.environ.get("DALLE_DEBUG", "") not in ("", "0")


def default_output_dir() -> Path:
    """Where images go when ``--out`` is not given: ``DALLE_OUTPUT_DIR``, the config file's ``output_dir``,
    else ``./dalle-out``.

    Raises:
        UsageError: the config file is unreadable or invalid.
    """
    return Path(user_default("output_dir") or "dalle-out").expanduser()


def env_default(name: str) -> str | None:
    """The value of ``DALLE_<NAME>`` or None."""
    return os.environ.get(f"DALLE_{name.upper()}") or None


def user_default(name: str) -> str | None:
    """The user's default for a :data:`CONFIG_KEYS` key: ``DALLE_<NAME>``, else the config file, else None.

    Raises:
        UsageError: the config file is unreadable or invalid.
    """
    return env_default(name) or file_config().get(name)


def config_dir() -> Path:
    """The per-user configuration folder (platformdirs)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("dallecli"))


def config_path() -> Path:
    """The config file: ``DALLE_CONFIG``, else ``config.toml`` in :func:`config_dir` (it may not exist)."""
    return Path(os.environ.get("DALLE_CONFIG") or config_dir() / CONFIG_NAME).expanduser()


def file_config() -> dict[str, str]:
    """The settings in the config file (empty when there is no file); each version of the file (path,
    modification time) is read once per process.

    Raises:
        UsageError: the file is not valid TOML, has an unknown key or a value that is not a string; the
            message names the file and the key.
    """
    path = config_path()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = None
    return dict(_read_config(path, stamp))


@lru_cache(maxsize=8)
def _read_config(path: Path, stamp: int | None) -> tuple[tuple[str, str], ...]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the config file {path} ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"the config file {path} is not valid TOML ({exc}); fix or delete it") from exc
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            raise UsageError(f"unknown key '{key}' in the config file {path}; known keys: {', '.join(CONFIG_KEYS)}")
        if not isinstance(value, str):
            raise UsageError(f"'{key}' in the config file {path} must be a string, e.g. {key} = \"...\"")
    return tuple((key, value) for key, value in data.items() if value)
