"""Running the server in-process: bind, preload the default model, serve with uvicorn until SIGTERM or Ctrl-C.

On a signal the server stops accepting, the requests still queued get 503, the pass in flight finishes and its
images are written (atomically: never half a file), and the process exits 0. A pass still running after
:data:`GRACE_SECONDS`, or at a second signal, is discarded at its next step (nothing of it is written). An idle
server stops at once: uvicorn closes idle keep-alive connections without waiting, and ``dalle serve`` then ends
the process without the interpreter's teardown of torch and diffusers (1.5-3.5 s on a busy 2-core machine, for
nothing: every image is written and every log line flushed by then).
"""

from __future__ import annotations

import logging
import socket
import sys
import time

from dallecli.errors import UsageError
from dallecli.serve.config import ServeConfig

log = logging.getLogger("dallecli.serve")
GRACE_SECONDS = 30  # how long a signal waits for the pass in flight to be answered before discarding it


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one).

    Raises:
        UsageError: the address is in use or cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); is another server running? Choose "
                         "another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("dallecli.serve")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def serve_forever(config: ServeConfig) -> None:
    """Preload the default model and serve until a signal (see the module docstring).

    Raises:
        UsageError: the port is taken, or the default model cannot be used.
        ModelNotFoundError and the engine's other errors: the default model cannot load.
    """
    import uvicorn

    from dallecli.engine.memory import available_bytes
    from dallecli.serve.app import create_app
    from dallecli.serve.batcher import Batcher
    from dallecli.serve.pool import EnginePool

    _logging()
    sock = bind(config.host, config.port)
    engine = None
    if config.memory_budget is None:
        from dataclasses import replace

        from dallecli.engine.device import resolve_device

        free = available_bytes(resolve_device(config.device))
        config = replace(config, memory_budget=int(free * 0.8) if free else None)
    pool = EnginePool(config)
    engine = pool.engine_for(None)
    pool.acquire(engine)  # the default model is warm before the first request
    if config.warmup:
        warm_up(engine)
    batcher = Batcher(pool, config.out, config.max_queue, config.batch_window, config.max_batch, engine.model.name)
    app = create_app(config, pool, batcher)
    shown = f"[{config.host}]" if ":" in config.host else config.host
    base = f"http://{shown}:{sock.getsockname()[1]}"
    log.info("dalle serve: listening on %s (model %s on %s, %s; images in %s%s)", base, engine.model.name,
             engine.device, engine.image_dtype + (", OpenVINO" if engine.backend == "openvino" else ""), config.out,
             "; API key required" if config.api_key else "")
    log.info("OpenAI API %s/v1, AUTOMATIC1111 API %s/sdapi/v1, web page %s/", base, base, base)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # stop taking work at once; the pass in flight finishes
            if self.should_exit:  # a second signal: the pass in flight is dropped at its next step, its requests
                batcher.abort()  # get 503 and the shutdown ends as usual (uvicorn's force_exit would skip the
                return  # app's shutdown and log a CancelledError; it also reacts to a second SIGINT only)
            batcher.stop()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):  # a clean shutdown exits 0, not by re-raising the signal
                captured.clear()

    server = Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=GRACE_SECONDS,
                                   server_header=False))
    try:
        server.run(sockets=[sock])
    finally:
        batcher.stop()
        batcher.abort()  # a pass still running now has outlived the grace period (or a second signal came)
        batcher.join(timeout=600)
        sock.close()
    log.info("dalle serve: stopped")


def warm_up(engine) -> float | None:
    """Run one tiny pass on a loaded ``engine`` and throw it away, so that the first request does not pay for what
    a first call costs (lazy initialisation in torch and diffusers, kernel choice, buffer allocation): the fewest
    steps its scheduler plans, at the smallest size its UNet (or transformer) takes. Logs and returns its seconds
    (None when it failed: the server starts anyway, the first request pays)."""
    from dallecli.engine.request import GenerationRequest
    from dallecli.engine.schedulers import check_steps
    from dallecli.errors import DalleError

    pipe = engine.pipe
    steps = 1
    while steps < 4:
        try:
            check_steps(pipe.scheduler, steps)
            break
        except DalleError:
            steps += 1
    side = smallest_side(pipe)
    started = time.perf_counter()
    try:
        engine.generate_items([("warm-up", 0)], GenerationRequest("warm-up", steps=steps, width=side, height=side))
    except Exception as exc:  # noqa: BLE001 - a warm-up never stops the server
        log.warning("warm-up pass failed (%s); the first request will be slower", exc)
        return None
    seconds = time.perf_counter() - started
    log.info("warm-up pass: %d step(s) at %dx%d in %.2f s (--no-warmup skips it)", steps, side, side, seconds)
    return seconds


def smallest_side(pipe) -> int:
    """The smallest image side (pixels, a multiple of 8) ``pipe`` runs: one latent pixel per UNet level (VAE scale
    x 2^(levels - 1)), or a transformer's 2x2 patch."""
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    unet = getattr(pipe, "unet", None)
    levels = len(getattr(unet.config, "block_out_channels", ())) if unet is not None else 0
    side = scale * 2 ** (levels - 1) if levels else scale * 2
    return max(8, -(-side // 8) * 8)
