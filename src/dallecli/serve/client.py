"""``dalle generate --server URL``: the request goes to a running ``dalle serve``; the images come back as PNG
bytes (their metadata chunks included) and are written here with the same names as an in-process run.

The request is sent to the OpenAI endpoint with dalle's extra fields and ``batch_size`` (1 unless
``--batch-size`` says otherwise), so the server runs the same passes as ``dalle generate`` would and the pixels
are the same. ``DALLE_API_KEY`` is sent as the bearer key when set.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from dallecli.errors import DalleError, ModelNotFoundError, ServerError, UsageError


def request_body(request, model: str | None) -> dict:
    """The JSON body of ``POST /v1/images/generations`` for a :class:`~dallecli.engine.request.GenerationRequest`."""
    body = {"prompt": request.prompt, "n": request.num_images, "response_format": "b64_json",
            "batch_size": request.batch_size or 1}
    optional = {"model": model, "negative_prompt": request.negative_prompt, "seed": request.seed,
                "steps": request.steps, "guidance_scale": request.guidance_scale, "width": request.width,
                "height": request.height, "scheduler": request.scheduler, "clip_skip": request.clip_skip}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _failure(status: int, text: str, url: str) -> DalleError:
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text.strip().splitlines()[0] if text.strip() else f"HTTP {status}"
    if status == 401:
        return UsageError(f"the server at {url} refused the API key ({message}); set DALLE_API_KEY")
    if status == 404:
        return ModelNotFoundError(f"the server at {url}: {message}")
    if status in (400, 413, 422):
        return UsageError(f"the server at {url} refused the request: {message}")
    return ServerError(f"the server at {url} answered {status}: {message}")


def _post(url: str, body: dict, headers: dict) -> tuple[int, str]:
    """POST ``body`` as JSON; ``(status, response text)``. Plain ``http.client``: httpx would add half a second
    of imports to every call, and the call is meant to cost start-up plus the image."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=None)
    try:
        connection.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                           body=json.dumps(body).encode("utf-8"),
                           headers={"Content-Type": "application/json", "Accept": "application/json", **headers})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def generate_on_server(url: str, request, model: str | None, folder: Path,
                       api_key: str | None = None) -> list[tuple[Path, dict]]:
    """Have the server at ``url`` make ``request``'s images and write them into ``folder``.

    Args:
        url: the server's base URL (``http://127.0.0.1:7860``; a trailing ``/v1`` is accepted).
        request: the :class:`~dallecli.engine.request.GenerationRequest`.
        model: the model to ask for (None: the server's default).
        folder: where the images go (named as :func:`dallecli.images.write_png` names them).
        api_key: the bearer key (default: ``DALLE_API_KEY``).

    Returns:
        ``(path written, settings dict)`` per image, in order.

    Raises:
        ServerError: the server cannot be reached or failed; UsageError / ModelNotFoundError for what it refused.
    """
    import http.client

    from dallecli.images import write_png_bytes

    base = url.rstrip("/").removesuffix("/v1")
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"--server {url}: give an http:// or https:// URL, e.g. http://127.0.0.1:7860")
    key = api_key or os.environ.get("DALLE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        status, text = _post(f"{base}/v1/images/generations", request_body(request, model), headers)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ServerError(f"cannot reach the dalle server at {base} ({reason}); start it with `dalle serve` or check "
                          "--server/DALLE_SERVER") from None
    if status != 200:
        raise _failure(status, text, base)
    try:
        items = json.loads(text)["data"]
        pairs = [(base64.b64decode(item["b64_json"]), item["dalle"]) for item in items]
    except (ValueError, KeyError, TypeError):
        raise ServerError(f"the server at {base} answered with something that is not a dalle images response") from None
    return [(write_png_bytes(data, folder, settings), settings) for data, settings in pairs]


def check_local_options(request, **options) -> None:
    """Refuse the ``dalle generate`` options that only mean something in-process (the server decides its device,
    dtype, VAE and memory mode, and takes no file paths from clients).

    Raises:
        UsageError: naming the first such option given.
    """
    if request.loras:
        raise UsageError("--lora cannot be used with --server (the server takes no file paths); run without --server")
    for name, value in options.items():
        if value is not None:
            raise UsageError(f"--{name.replace('_', '-')} cannot be used with --server (the server's own setting "
                             "applies); leave it out or run without --server")
