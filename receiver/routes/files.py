"""Serves archived files to holders of a link from `/api/tasks/{id}/assets/{index}/url`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from receiver.links import FILES_PREFIX, open_link
from receiver.routes._responses import error

__all__ = ["routes"]


async def serve_file(request: Request) -> Response:
    """The file a valid, unexpired link names, if it lies in the storage directory."""
    settings = request.app.state.settings
    location = open_link(settings.secret("callback_secret"), request.path_params["token"])
    gone = error(404, "unknown_link", "This link is not valid, or it has expired.")
    if location is None:
        return gone
    root = getattr(request.app.state.sink, "root", None)
    if root is None or not await asyncio.to_thread(_servable, Path(location), root):
        return gone
    return FileResponse(location)


def _servable(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root) and path.is_file()


routes = [Route(FILES_PREFIX + "/{token}", serve_file)]
