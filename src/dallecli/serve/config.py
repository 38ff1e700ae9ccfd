"""The server's settings (:class:`ServeConfig`) and the rule that a non-loopback address needs an API key."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from dallecli.errors import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # AUTOMATIC1111's port: Open WebUI and A1111 plug-ins expect it
MAX_BODY_BYTES = 4 * 1024 * 1024  # JSON requests are tiny; OpenAI's own limit for an uploaded PNG is 4 MB
MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # the image routes: two 4 MB PNGs, base64-encoded (x 4/3), with room to spare
MAX_SIDE = 2048  # pixels per side a request may ask for
MAX_IMAGES = 10  # OpenAI's limit on n
MAX_A1111_IMAGES = 64  # batch_size x n_iter


@dataclass(frozen=True)
class ServeConfig:
    """What ``dalle serve`` was started with.

    Attributes:
        host, port: where to listen (port 0: any free port).
        model: the default model (alias, repo id or folder; None: the embedded model); ``dalle serve`` gives
            ``--model``, else the user's default (``DALLE_MODEL``, the config file), as every command does.
            OpenAI's model names (``dall-e-3``, ...) mean it.
        out: folder the images are written to and ``/files`` serves.
        api_key: the key every API route asks for (``Authorization: Bearer KEY``), or None (loopback only).
        allow_download: let a request for a model that is not downloaded download it (never otherwise).
        keep_alive: seconds a model stays loaded after its last use (None: until the server stops).
        memory_budget: bytes the loaded models may take together (None: no limit); the least recently used
            model is unloaded to make room.
        max_queue: requests waiting at most; one more gets 503.
        batch_window: seconds the worker waits for more requests with the same settings before a pass.
        max_batch: images per forward pass at most (1: no dynamic batching).
        device, dtype, cache_dir, backend: as for ``dalle generate`` (backend: "torch" or "openvino").
        max_body_bytes: largest request body accepted (413 above).
        max_upload_bytes: the same for the routes that take images (``/v1/images/edits``, ``/variations``,
            ``/sdapi/v1/img2img``): an image and a mask of OpenAI's 4 MB each, base64 or multipart, fit.
        warmup: run one tiny pass after preloading the default model (``--no-warmup``: not).
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model: str | None = None
    out: Path = Path("dalle-out")
    api_key: str | None = None
    allow_download: bool = False
    keep_alive: float | None = None
    memory_budget: int | None = None
    max_queue: int = 64
    batch_window: float = 0.05
    max_batch: int = 8
    device: str | None = None
    dtype: str | None = None
    cache_dir: Path | None = None
    backend: str = "torch"
    max_body_bytes: int = MAX_BODY_BYTES
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    warmup: bool = True

    def __repr__(self) -> str:  # never show the key (tracebacks, logs)
        shown = {k: ("***" if k == "api_key" and v else v) for k, v in self.__dict__.items()}
        return "ServeConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: ``localhost``, 127.0.0.0/8 and ``::1``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_config(config: ServeConfig) -> None:
    """Check the settings before anything loads.

    Raises:
        UsageError: a non-loopback ``host`` without an API key, a value out of range, or an unknown backend.
    """
    from dallecli.engine.ov_backend import normalize_backend

    normalize_backend(config.backend)
    if not is_loopback(config.host) and not config.api_key:
        raise UsageError(f"--host {config.host} lets other machines connect: give --api-key KEY (or set "
                         "DALLE_API_KEY), or bind 127.0.0.1")
    if config.api_key is not None and len(config.api_key) < 8:
        raise UsageError("--api-key must be at least 8 characters")
    if not 0 <= config.port <= 65535:
        raise UsageError(f"--port {config.port} is out of range (0-65535; 0 picks a free port)")
    if config.max_queue < 1:
        raise UsageError(f"--max-queue must be at least 1 (got {config.max_queue})")
    if config.max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1 (got {config.max_batch})")
    if config.batch_window < 0:
        raise UsageError(f"--batch-window must be 0 or more milliseconds (got {config.batch_window * 1000:g})")
    if config.keep_alive is not None and config.keep_alive <= 0:
        raise UsageError(f"--keep-alive must be more than 0 seconds (got {config.keep_alive:g})")
