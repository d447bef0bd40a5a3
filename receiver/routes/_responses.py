"""JSON error bodies: a machine-readable code and a sentence a person understands."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = ["JSON", "MAX_PAGE", "BadQuery", "bad_query", "error", "http_error", "page_limit"]

MAX_PAGE = 200  # items in one page of a list

# What JSONResponse.render's json.dumps(...) builds on every call, built once.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class JSON(JSONResponse):
    """A JSONResponse, byte for byte, that reuses one encoder instead of making one per answer."""

    def render(self, content: Any) -> bytes:
        return _ENCODER.encode(content).encode("utf-8")


def error(
    status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSON({"error": code, "message": message}, status_code, headers=headers)


_MESSAGES = {
    404: ("not_found", "There is nothing at this URL."),
    405: ("method_not_allowed", "This URL does not accept that HTTP method."),
}


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 and friends, as JSON like every other error."""
    assert isinstance(exc, HTTPException)
    code, message = _MESSAGES.get(exc.status_code, ("http_error", str(exc.detail)))
    return error(exc.status_code, code, message, headers=exc.headers)


class BadQuery(ValueError):
    """A query parameter that cannot be used: answered 400 `bad_query` with this message."""


async def bad_query(request: Request, exc: Exception) -> Response:
    return error(400, "bad_query", str(exc))


def page_limit(query: Mapping[str, str], default: int = 50) -> int:
    """The `limit` of a list request: 1 to MAX_PAGE items."""
    text = query.get("limit") or str(default)
    # isdigit() alone accepts "²", which int() refuses.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_PAGE:
        raise BadQuery(f"limit must be a whole number from 1 to {MAX_PAGE}.")
    return int(text)
