"""Errors as the OpenAI API answers them: ``{"error": {"message", "type", "param", "code"}}`` with a status.

:func:`from_dalle_error` maps the project's errors (:mod:`dallecli.errors`) to a status: bad input 400, a model
that is not available 404 (``model_not_found``), a model that cannot do the task 400
(``model_cannot_do_task``), the rest 500 (507 for a full disk). Every route answers in this shape, FastAPI's
own 422 and 404 bodies included (see :mod:`dallecli.serve.app`).
"""

from __future__ import annotations

from dallecli.errors import (DalleError, DiskFullError, ModelNotFoundError, OutOfMemoryError, TaskUnsupportedError,
                             UsageError)


class ApiError(Exception):
    """An error answer: HTTP ``status`` and the OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error`` naming the parameter."""
    return ApiError(400, message, param=param, code=code)


# the CLI flags the engine's messages name, and the request parameters they are
_FLAG_PARAMS = {"--steps": "steps", "--guidance": "guidance_scale", "--seed": "seed", "--width": "width",
                "--height": "height", "--scheduler": "scheduler", "--clip-skip": "clip_skip",
                "--negative-prompt": "negative_prompt", "--num-images": "n", "--batch-size": "batch_size",
                "--strength": "strength", "--mask": "mask", "--image": "image", "image upload:": "image",
                "mask upload:": "mask"}


def from_dalle_error(exc: DalleError, param: str | None = None) -> ApiError:
    """The answer for one of the project's errors (``param``: the request parameter at fault, else the one the
    message names as a CLI flag)."""
    message = str(exc)
    if param is None:
        named = sorted((message.find(flag), name) for flag, name in _FLAG_PARAMS.items() if flag in message)
        param = named[0][1] if named else None
    if isinstance(exc, ModelNotFoundError):
        return ApiError(404, message, param="model", code="model_not_found")
    if isinstance(exc, TaskUnsupportedError):
        return ApiError(400, message, param="model", code="model_cannot_do_task")
    if isinstance(exc, UsageError) or getattr(exc, "exit_code", 1) == 2:
        return ApiError(400, message, param=param)
    if isinstance(exc, DiskFullError):
        return ApiError(507, message, type="server_error")
    if isinstance(exc, OutOfMemoryError):
        return ApiError(500, message, type="server_error", code="out_of_memory")
    return ApiError(500, message, type="server_error")


def validation_error(errors: list[dict]) -> ApiError:
    """The 400 for pydantic's validation errors (FastAPI's 422), naming the first bad parameter."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, "We could not parse the JSON body of your request: it is not valid JSON",
                        code="invalid_json")
    where = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(where) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    if param is None:
        return ApiError(400, "The request body must be a JSON object", code="invalid_body")
    return ApiError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


async def parse_json(request, model):
    """The request's JSON body (whatever its Content-Type says) validated as the pydantic ``model``.

    Raises:
        ApiError: 400 for a body that is not JSON or does not fit ``model``.
    """
    import json

    from pydantic import ValidationError

    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else None
    except ValueError:
        raise ApiError(400, "We could not parse the JSON body of your request: it is not valid JSON",
                       code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
