"""Serves archived files to holders of a link from `/api/tasks/{id}/assets/{index}/url`,
and the sample files of `kling-receiver trigger` to anyone."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from receiver.links import FILES_PREFIX, open_link
from receiver.routes._responses import error
from receiver.samples import SAMPLES_PATH, sample_bytes

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


async def serve_sample(request: Request) -> Response:
    """One of the sample files (`receiver.samples`): public bytes, the same for everyone."""
    found = sample_bytes(request.path_params["name"])
    if found is None:
        return error(404, "unknown_sample", "There is no sample file of that name.")
    data, content_type = found
    return Response(data, media_type=content_type, headers={"cache-control": "max-age=86400"})


routes = [
    Route(FILES_PREFIX + "/{token}", serve_file),
    Route(SAMPLES_PATH + "{name}", serve_sample, methods=["GET", "HEAD"]),
]
