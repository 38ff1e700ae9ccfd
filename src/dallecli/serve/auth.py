"""The API key: checked in constant time on every API route, never logged; file links signed with it.

Clients send ``Authorization: Bearer KEY`` (OpenAI clients). Clients that only know AUTOMATIC1111's
``--api-auth user:password`` (Open WebUI) send ``Authorization: Basic base64(user:KEY)``: the password is the key
and the user name is not checked. ``url`` answers carry ``?sig=``, an HMAC of the file name under the key, so
that a browser ``<img>`` or a client that downloads the URL without headers can fetch that file and no other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from starlette.requests import Request


def key_matches(authorization: str | None, key: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``key`` (always True when the server has no key).

    Args:
        authorization: the header's value, or None when absent.
        key: the server's API key, or None.
    """
    if not key:
        return True
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8"), key.encode("utf-8"))


def file_signature(key: str, name: str) -> str:
    """The ``sig`` query parameter that lets ``/files/NAME`` be fetched without the key."""
    return hmac.new(key.encode("utf-8"), b"files/" + name.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def signature_matches(key: str | None, name: str, sig: str | None) -> bool:
    """Whether ``sig`` is :func:`file_signature` of ``name`` (compared in constant time)."""
    if not key or not sig:
        return False
    return hmac.compare_digest(file_signature(key, name).encode(), sig.encode("utf-8", "replace"))


def key_error(authorization: str | None):
    """The 401 :class:`~dallecli.serve.errors.ApiError` for a missing or a wrong key (the key is never quoted)."""
    from dallecli.serve.errors import ApiError

    if not authorization:
        return ApiError(401, "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
                             "(Authorization: Bearer YOUR_KEY)", code="missing_api_key")
    return ApiError(401, "Incorrect API key provided", code="invalid_api_key")


async def require_key(request: Request) -> None:
    """FastAPI dependency of every API route: ``Authorization: Bearer KEY`` (or Basic with the key as password)
    when the server has a key, compared in constant time (:func:`key_matches`).

    Raises:
        ApiError: 401.
    """
    header = request.headers.get("authorization")
    if not key_matches(header, request.app.state.dalle.config.api_key):
        raise key_error(header)
