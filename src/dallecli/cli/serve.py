"""``dalle serve``: keep models loaded behind the OpenAI Images API, the AUTOMATIC1111 API and a web page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dallecli.cli.errors import handles_errors
from dallecli.cli.options import Backend, CacheDir, Device, Dtype, Model


@handles_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; any other than 127.0.0.1/localhost/::1 needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (7860, AUTOMATIC1111's; 0 picks a free one).")] = 7860,
    model: Model = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the images, served at /files (default: ./dalle-out or $DALLE_OUTPUT_DIR).")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="DALLE_API_KEY", show_envvar=True, help="Key every API call must send (Authorization: Bearer KEY).")] = None,
    allow_download: Annotated[bool, typer.Option("--allow-download", help="Let a request for a model that is not downloaded download it.")] = False,
    keep_alive: Annotated[Optional[float], typer.Option(help="Unload a model after this many idle seconds (default: keep it).")] = None,
    memory_budget: Annotated[Optional[float], typer.Option(help="GB the loaded models may take together; the least recently used is unloaded (default: 80% of the free memory at start).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; one more gets 503.")] = 64,
    batch_window: Annotated[float, typer.Option(help="Milliseconds to gather requests with the same settings into one forward pass.")] = 50.0,
    max_batch: Annotated[int, typer.Option(help="Images per forward pass at most (1: no dynamic batching).")] = 8,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="Run one tiny pass after loading --model, so that the first request is not the slow one.")] = True,
    device: Device = None,
    dtype: Dtype = None,
    backend: Backend = None,
    cache_dir: CacheDir = None,
) -> None:
    """Serve models over HTTP: OpenAI Images API, AUTOMATIC1111 API and a web page."""
    from dallecli.config import default_output_dir, user_default
    from dallecli.errors import UsageError
    from dallecli.images import prepare_output_folder
    from dallecli.serve.config import ServeConfig, check_config

    config = ServeConfig(
        host=host, port=port, model=model or user_default("model"), out=(out or default_output_dir()).resolve(),
        api_key=api_key or None, allow_download=allow_download, keep_alive=keep_alive,
        memory_budget=None if memory_budget is None else int(memory_budget * 1e9), max_queue=max_queue,
        batch_window=batch_window / 1000, max_batch=max_batch, device=device or user_default("device"),
        dtype=dtype or user_default("dtype"), cache_dir=cache_dir, warmup=warmup,
        backend=backend or user_default("backend") or "torch",
    )
    check_config(config)  # before anything loads: a public address without a key never starts
    prepare_output_folder(config.out)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        from starlette import formparsers
    except ImportError as exc:
        raise UsageError(f"dalle serve needs {exc.name}: pip install 'dallecli[serve]'") from None
    if formparsers.multipart is None:  # the uploads of /v1/images/edits and /variations
        raise UsageError("dalle serve needs python-multipart: pip install 'dallecli[serve]'")
    from dallecli.serve.run import serve_forever

    serve_forever(config)
    # stopped cleanly: every image written, the worker joined. Skip the interpreter's teardown of torch and
    # diffusers (seconds on a busy machine), so that a stop takes well under a second.
    import logging
    import os
    import sys

    logging.shutdown()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
