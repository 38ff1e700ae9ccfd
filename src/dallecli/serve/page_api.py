"""The web page and its routes, and ``/files/NAME``.

- ``GET /``: ``static/index.html``; ``/static/...``: that folder (the page's files).
- ``GET /dalle/v1/images?limit=N``: ``{"images": [{"url", "name", "created", "settings"}]}``, newest first, from
  the output folder (settings read from each PNG's metadata).
- ``GET /dalle/v1/progress``: ``{"busy", "loading", "step", "steps", "queued", "model"}`` (``loading``: the pass's
  model is loading, before its first step).
- ``GET /files/NAME``: a PNG directly inside the output folder, nothing else: the name must be a plain file name
  (no separator, no ``..``, not hidden), the file a regular file (not a symlink) whose folder is the output folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response

from dallecli.serve.auth import key_error, key_matches, signature_matches
from dallecli.serve.errors import ApiError
from dallecli.serve.openai_api import file_url
from dallecli.serve.service import ServerState

STATIC = Path(__file__).resolve().parent / "static"
router = APIRouter()  # the key-protected routes
public = APIRouter()  # the page itself (it asks for the key) and /files (key or signed link)


def _not_found(what: str = "No such file") -> ApiError:
    return ApiError(404, what, code="not_found")


def safe_file(folder: Path, name: str) -> Path:
    """The PNG ``name`` directly inside ``folder``.

    Raises:
        ApiError: 404 for anything else (a path, ``..``, a hidden or temporary file, a symlink, a folder, not a PNG).
    """
    if (not name or name != os.path.basename(name) or "/" in name or "\\" in name or "\x00" in name
            or name.startswith(".") or not name.lower().endswith(".png")):
        raise _not_found()
    path = folder / name
    try:
        info = os.lstat(path)
    except (OSError, ValueError):
        raise _not_found() from None
    if not stat.S_ISREG(info.st_mode) or path.parent.resolve() != folder.resolve():
        raise _not_found()
    return path


@public.get("/files/{name}")
async def files(name: str, request: Request, sig: str | None = None) -> Response:
    """An image from the output folder (the API key, or the ``sig`` of a ``url`` answer)."""
    state: ServerState = request.app.state.dalle
    key = state.config.api_key
    header = request.headers.get("authorization")
    if key and not (key_matches(header, key) or signature_matches(key, name, sig)):
        raise key_error(header if header or sig else None)
    path = safe_file(state.config.out, name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # a symlink swapped in meanwhile fails
    except OSError:
        raise _not_found() from None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


@public.get("/", include_in_schema=False)
async def index() -> Response:
    """The web page."""
    page = STATIC / "index.html"
    if not page.is_file():
        raise _not_found("the web page is not installed")
    return FileResponse(page, media_type="text/html")


@router.get("/dalle/v1/images")
async def recent_images(request: Request, limit: int = Query(50, ge=1, le=500)) -> dict:
    """The newest images in the output folder with their settings."""
    from starlette.concurrency import run_in_threadpool

    state: ServerState = request.app.state.dalle
    found = await run_in_threadpool(_recent, state.config.out, limit)
    return {"images": [{"url": file_url(request, state, path.name), "name": path.name, "created": created,
                        "settings": settings} for path, created, settings in found]}


def _recent(folder: Path, limit: int) -> list[tuple[Path, int, dict]]:
    from dallecli.errors import UsageError
    from dallecli.images import read_metadata

    entries = []
    try:
        with os.scandir(folder) as listing:
            for entry in listing:
                if entry.name.startswith(".") or not entry.name.lower().endswith(".png"):
                    continue
                if entry.is_file(follow_symlinks=False):
                    entries.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
    except OSError:
        return []
    found = []
    for mtime, name in sorted(entries, reverse=True):
        try:
            settings = read_metadata(folder / name)
        except (UsageError, OSError):
            continue
        settings.pop("source", None)
        found.append((folder / name, int(mtime), settings))
        if len(found) >= limit:
            break
    return found


@router.get("/dalle/v1/progress")
async def progress(request: Request) -> dict:
    """What the worker is doing: ``{"busy", "loading", "step", "steps", "queued", "model"}``."""
    state: ServerState = request.app.state.dalle
    return state.batcher.progress()
