"""Paths, environment variables and the config file, read in one place.

Defaults for ``generate`` and ``batch`` come, first found wins, from: the command-line flag, the environment
variable ``DALLE_<KEY>``, the config file, the built-in default. Keys (:data:`CONFIG_KEYS`):

    model        DALLE_MODEL        default model alias, repo id or path (otherwise the embedded model).
    output_dir   DALLE_OUTPUT_DIR   default folder for images (otherwise ``./dalle-out``).
    device       DALLE_DEVICE       default device (auto, cpu, cuda, cuda:N, mps).
    dtype        DALLE_DTYPE        default dtype (auto, float32, float16, bfloat16).
    scheduler    DALLE_SCHEDULER    default scheduler (euler, dpm++, ...; otherwise the model's).
    backend      DALLE_BACKEND      what runs the UNet and VAE decoder on the CPU (torch, openvino).
    progress     DALLE_PROGRESS     progress display (auto, bar, plain, none) of every command that shows one.

Other environment variables:
    DALLE_DEBUG=1      show tracebacks instead of one-line errors.
    DALLE_CONFIG       path of the config file (otherwise ``config.toml`` in :func:`config_dir`); a path that
                       does not exist is an error, not an empty configuration.
    DALLE_THREADS      CPU threads for torch (a whole number >= 1; see :mod:`dallecli.engine.threads`).
    DALLE_CACHE        folder for dalle's own cache (single-file model configs).
    DALLE_SERVER       URL of a running ``dalle serve`` for ``dalle generate --server``.
    DALLE_API_KEY      the key of ``dalle serve`` and of its clients.

A bad value is refused before anything loads (:func:`check_environment`), in a message that names its
variable, or the config file and key it came from (:func:`setting_source`).
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

CONFIG_KEYS = ("model", "output_dir", "device", "dtype", "scheduler", "progress", "backend")
PROGRESS_MODES = ("auto", "bar", "plain", "none")
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


def cache_dir() -> Path:
    """dalle's own cache folder (single-file model configs, checkpoint digests): ``DALLE_CACHE``, else the
    per-user cache folder (platformdirs)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("DALLE_CACHE") or user_cache_dir("dallecli"))


def config_path() -> Path:
    """The config file: ``DALLE_CONFIG``, else ``config.toml`` in :func:`config_dir` (it may not exist)."""
    return Path(os.environ.get("DALLE_CONFIG") or config_dir() / CONFIG_NAME).expanduser()


def setting_source(name: str) -> str | None:
    """Where the user's default for the :data:`CONFIG_KEYS` key ``name`` comes from, as an error message names
    it: ``"DALLE_DEVICE"``, ``"'device' in the config file PATH"``, or None when neither sets it.

    Raises:
        UsageError: the config file is unreadable or invalid.
    """
    if env_default(name):
        return f"DALLE_{name.upper()}"
    if name in file_config():
        return f"'{name}' in the config file {config_path()}"
    return None


def parse_threads(value: str | None, variable: str = "DALLE_THREADS") -> int | None:
    """The thread count in ``value`` (an environment variable's text), None when it is unset or blank.

    Raises:
        UsageError: not a whole number >= 1; the message names ``variable`` and the value.
    """
    text = (value or "").strip()
    if not text:
        return None
    if not (text.isdigit() and int(text) > 0):
        raise UsageError(f"{variable}={text!r}: give a whole number of threads, at least 1 (or unset it)")
    return int(text)


def environment_problems() -> list[str]:
    """Bad values in the ``DALLE_*`` variables and the config file's settings, checked without importing torch
    or diffusers: ``DALLE_THREADS``, ``DALLE_PROGRESS``/``progress``, ``DALLE_DEVICE``/``device``,
    ``DALLE_DTYPE``/``dtype``, ``DALLE_BACKEND``/``backend`` and ``DALLE_SCHEDULER``/``scheduler`` (a short name, or a name shaped like a
    diffusers class, which is looked up when it is used). A config file that cannot be read is left to
    :func:`file_config`'s error.

    Returns:
        One sentence per bad value, naming its variable (or the file and key) and what to give instead.
    """
    from dallecli.engine.device import check_device_name, normalize_dtype
    from dallecli.engine.ov_backend import normalize_backend
    from dallecli.engine.schedulers import check_scheduler_name

    problems = []
    try:
        parse_threads(os.environ.get("DALLE_THREADS"))
    except UsageError as exc:
        problems.append(str(exc))
    try:
        settings = file_config()
    except UsageError:
        settings = {}
    checks = {"device": check_device_name, "dtype": normalize_dtype, "scheduler": check_scheduler_name,
              "progress": check_progress_mode, "backend": normalize_backend}
    for key, check in checks.items():
        value = env_default(key) or settings.get(key)
        if value is None:
            continue
        try:
            check(value, source=f"DALLE_{key.upper()}" if env_default(key) else
                  f"'{key}' in the config file {config_path()}")
        except UsageError as exc:
            problems.append(str(exc))
    return problems


def check_environment() -> None:
    """Refuse bad configuration before a command does anything: a ``DALLE_CONFIG`` that names no file, an
    invalid config file, or a bad value listed by :func:`environment_problems`.

    Raises:
        UsageError: the first problem found, naming the variable or the file and key it came from.
    """
    file_config()
    problems = environment_problems()
    if problems:
        raise UsageError(problems[0])


def check_progress_mode(value: str, source: str = "--progress") -> str:
    """``value`` if it is one of :data:`PROGRESS_MODES`.

    Raises:
        UsageError: another value; the message names ``source`` (``--progress``, ``DALLE_PROGRESS`` or the
            config file's key).
    """
    if value not in PROGRESS_MODES:
        raise UsageError(f"unknown {source} '{value}'; choose one of {', '.join(PROGRESS_MODES)}")
    return value


def file_config() -> dict[str, str]:
    """The settings in the config file (empty when there is no file); each version of the file (path,
    modification time) is read once per process.

    Raises:
        UsageError: ``DALLE_CONFIG`` names a file that does not exist; the file is not valid TOML, has an
            unknown key or a value that is not a string (the message names the file and the key).
    """
    path = config_path()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = None
        named = os.environ.get("DALLE_CONFIG")
        if named and not path.exists():  # a typo in DALLE_CONFIG must not silently drop every setting
            raise UsageError(f"DALLE_CONFIG={named}: no such file; create it, or unset DALLE_CONFIG to use "
                             f"{config_dir() / CONFIG_NAME}") from None
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
