"""JSON error bodies: a machine-readable code and a sentence a person understands."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = ["error", "http_error"]


def error(
    status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code, headers=headers)


_MESSAGES = {
    404: ("not_found", "There is nothing at this URL."),
    405: ("method_not_allowed", "This URL does not accept that HTTP method."),
}


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 and friends, as JSON like every other error."""
    assert isinstance(exc, HTTPException)
    code, message = _MESSAGES.get(exc.status_code, ("http_error", str(exc.detail)))
    return error(exc.status_code, code, message, headers=exc.headers)
