"""The FastAPI application: :func:`create_app` puts the routes, the key check, the body-size limit and the
OpenAI-shaped error answers together around one engine pool and one batcher."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from dallecli.serve import a1111_api, openai_api, page_api
from dallecli.serve.auth import require_key
from dallecli.serve.batcher import Batcher
from dallecli.serve.config import ServeConfig
from dallecli.serve.errors import ApiError, validation_error
from dallecli.serve.pool import EnginePool
from dallecli.serve.service import ServerState

log = logging.getLogger("dallecli.serve")


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="dalle"'} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


DRAIN_LIMIT = 64 * 1024 * 1024  # a too-large body up to this size is read to its end before the 413 is sent

# the routes that take images (multipart uploads, base64 in JSON) get the larger upload limit
UPLOAD_ROUTES = ("/v1/images/edits", "/v1/images/variations", "/sdapi/v1/img2img")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes (``upload_limit`` for :data:`UPLOAD_ROUTES`, multipart
    or JSON alike) gets 413 before any route sees it (declared by Content-Length or counted while it arrives)."""

    def __init__(self, app, limit: int, upload_limit: int | None = None):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit or limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope.get("path", "").rstrip("/") in UPLOAD_ROUTES else self.limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            drain = declared.isdigit() and int(declared) <= DRAIN_LIMIT
            return await self._too_large(send, limit, receive if drain else None)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._too_large(send, limit, receive if more else None, size)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send, limit: int, receive=None, read: int = 0) -> None:
        """Answer 413. With ``receive``, the rest of the body (up to :data:`DRAIN_LIMIT` in all) is read and
        dropped first: a client still sending when the answer comes and the connection closes sees a reset
        instead of the answer."""
        while receive is not None and read <= DRAIN_LIMIT:
            message = await receive()
            read += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = json.dumps(ApiError(413, f"The request body is larger than {limit} bytes",
                                   code="request_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(config: ServeConfig, pool: EnginePool, batcher: Batcher) -> FastAPI:
    """The ``dalle serve`` application.

    Args:
        config: the server's settings.
        pool: the engines (the caller preloads the default model through it before serving).
        batcher: the queue over ``pool``; its worker starts with the app and stops with it.

    Returns:
        A FastAPI app with the OpenAI, AUTOMATIC1111 and page routes under :data:`app.state.dalle`.
    """
    state = ServerState(config, pool, batcher)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="dalle", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dalle = state
    protected = [Depends(require_key)]
    app.include_router(openai_api.router, dependencies=protected)
    app.include_router(a1111_api.router, dependencies=protected)
    app.include_router(page_api.router, dependencies=protected)
    app.include_router(page_api.public)
    app.mount("/static", StaticFiles(directory=page_api.STATIC, check_dir=False), name="static")

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        return _error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, str(exc.detail))
        return _error_response(ApiError(exc.status_code, message, type=kind))

    app.add_middleware(BodyLimit, limit=config.max_body_bytes, upload_limit=config.max_upload_bytes)
    return app
