"""The read API under /api, for people and integrations holding ADMIN_TOKEN."""

from __future__ import annotations

import hmac
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from receiver._clock import utc_in
from receiver.documents import task_json
from receiver.ledger import Ledger
from receiver.links import file_link
from receiver.models import AssetRecord, AssetState, EventRecord, TaskRecord, TaskStatus
from receiver.routes._responses import error, page_limit
from receiver.submit import SubmitError, submit

__all__ = ["AdminAuth", "requeue", "routes", "signed_link", "task_json"]


class AdminAuth:
    """Lets a request through only with `Authorization: Bearer <ADMIN_TOKEN>` (or the token
    of the `setting` named)."""

    def __init__(self, app: ASGIApp, token: str, setting: str = "ADMIN_TOKEN") -> None:
        self.app = app
        self.expected = token.encode()
        self.setting = setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            wrong_scheme = scheme.lower() != "bearer"
            if not hmac.compare_digest(given.strip().encode(), self.expected) or wrong_scheme:
                response = error(
                    401,
                    "unauthorized",
                    f"Send the {self.setting} as `Authorization: Bearer <token>`.",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def event_json(event: EventRecord) -> dict[str, Any]:
    return {
        "id": event.id,
        "source": event.source,
        "status": event.status,
        "received_at": event.received_at,
        "last_received_at": event.last_received_at,
        "times_received": event.times_received,
        "applied": event.applied,
        "shape": event.shape,
        "remote": event.remote,
        "headers": event.headers,
        "body": event.body.decode("utf-8", "replace"),
    }


def _ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


def _no_task(task_id: str) -> Response:
    return error(404, "unknown_task", f"No task {task_id!r} is recorded here.")


async def get_task(request: Request) -> Response:
    task_id = request.path_params["task_id"]
    task = await _ledger(request).task(task_id)
    return _no_task(task_id) if task is None else JSONResponse(task_json(task))


async def list_events(request: Request) -> Response:
    task_id = request.path_params["task_id"]
    events = await _ledger(request).events(task_id)
    if events is None:
        return _no_task(task_id)
    return JSONResponse({"task_id": task_id, "events": [event_json(e) for e in events]})


async def list_tasks(request: Request) -> Response:
    query = request.query_params
    try:
        status = TaskStatus(query["status"]) if query.get("status") else None
    except ValueError:
        choices = ", ".join(s.value for s in TaskStatus)
        return error(400, "bad_query", f"status must be one of {choices}.")
    archived = query.get("archived")
    if archived not in (None, "", "true", "false"):
        return error(400, "bad_query", "archived must be true or false.")
    limit = page_limit(query)
    try:
        page = await _ledger(request).tasks(
            status=status,
            archived=None if not archived else archived == "true",
            limit=limit,
            cursor=query.get("cursor") or None,
        )
    except ValueError as exc:
        return error(400, "bad_query", f"{exc}.")
    return JSONResponse(
        {"tasks": [task_json(task) for task in page.tasks], "next_cursor": page.next_cursor}
    )


MAX_LINK_SECONDS = 7 * 24 * 3600


async def asset_url(request: Request) -> Response:
    """A short-lived URL to open an archived file: `{"url": ..., "expires_at": ...}`."""
    task_id = request.path_params["task_id"]
    query = request.query_params
    expires_text = query.get("expires_in") or "3600"
    if not (expires_text.isascii() and expires_text.isdigit()) or not (
        1 <= int(expires_text) <= MAX_LINK_SECONDS
    ):
        return error(400, "bad_query", f"expires_in must be 1 to {MAX_LINK_SECONDS} seconds.")
    task = await _ledger(request).task(task_id)
    if task is None:
        return _no_task(task_id)
    asset = _one_asset(task, request.path_params["index"], query.get("kind"), query.get("variant"))
    if isinstance(asset, Response):
        return asset
    if asset.state is not AssetState.stored or asset.location is None:
        return error(409, "not_stored", f"The asset is {asset.state.value}, not stored yet.")
    seconds = int(expires_text)
    url = signed_link(request, asset.location, seconds)
    return JSONResponse({"url": url, "expires_at": utc_in(seconds)})


def signed_link(request: Request, location: str, seconds: int) -> str:
    """A URL that opens the stored file at `location` for `seconds`, made without a request."""
    url: str | None = request.app.state.sink.presign(location, seconds)
    if url is None:  # a local file: the service serves it through a link of its own
        settings = request.app.state.settings
        secret = settings.secret("callback_secret")
        url = settings.public_url + file_link(secret, location, int(time.time()) + seconds)
    return url


def _one_asset(
    task: TaskRecord, index: str, kind: str | None, variant: str | None
) -> AssetRecord | Response:
    """The asset `index` (of `kind`, and `variant`) names; the main file of an output wins."""
    matches = [
        a
        for a in task.assets
        if str(a.index) == index and kind in (None, a.kind.value) and variant in (None, a.variant)
    ]
    if variant is None and len(matches) > 1:
        matches = [a for a in matches if a.variant == ""] or matches
    if len(matches) == 1:
        return matches[0]
    if not matches:
        return error(404, "unknown_asset", f"Task {task.task_id}: no such asset.")
    choices = ", ".join(sorted({f"kind={a.kind.value}&variant={a.variant}" for a in matches}))
    return error(
        400, "unknown_asset", f"Task {task.task_id}: several assets have this index; add {choices}."
    )


async def retry_task(request: Request) -> Response:
    """Queue the task's failed assets again; `?force=true` also re-fetches stored ones."""
    task_id = request.path_params["task_id"]
    force = request.query_params.get("force", "false")
    if force not in ("true", "false"):
        return error(400, "bad_query", "force must be true or false.")
    queued = await requeue(request, task_id, force=force == "true")
    if queued is None:
        return _no_task(task_id)
    return JSONResponse({"task_id": task_id, "queued": queued})


async def requeue(request: Request, task_id: str, *, force: bool) -> int | None:
    """Queue a task's failed (and with `force`, stored) assets, waking this process's
    downloads; how many were queued, or None for an unknown task."""
    queued = await _ledger(request).requeue(task_id, force=force)
    if queued and request.app.state.downloader is not None:
        request.app.state.downloader.wake()
    return queued


async def create_task(request: Request) -> Response:
    """Submit a task to Kling with its own callback URL: 201 with the task (200 on a replay)."""
    client = request.app.state.kling
    if client is None:
        return error(
            503,
            "kling_not_configured",
            "Set KLING_API_KEY (or KLING_ACCESS_KEY and KLING_SECRET_KEY) to submit tasks.",
        )
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= 200 and key.isprintable()):
        return error(400, "bad_idempotency_key", "Idempotency-Key must be 1 to 200 characters.")
    try:
        body = await request.json()
    except ValueError:
        return error(400, "bad_json", 'The body must be JSON: {"action": ..., "params": {...}}.')
    if not isinstance(body, dict):
        return error(422, "bad_params", "The body must be an object with action and params.")
    try:
        task, new = await submit(
            _ledger(request),
            client,
            request.app.state.settings,
            body.get("action"),
            body.get("params"),
            key,
        )
    except SubmitError as exc:
        return JSONResponse(exc.as_json(), exc.status_code)
    return JSONResponse(task_json(task), 201 if new else 200)


async def stats(request: Request) -> Response:
    counters = request.app.state.stats.as_dict()
    return JSONResponse(counters | {"ledger": await _ledger(request).stats()})


routes = [
    Route("/tasks", list_tasks, methods=["GET"]),
    Route("/tasks", create_task, methods=["POST"]),
    Route("/tasks/{task_id}", get_task),
    Route("/tasks/{task_id}/events", list_events),
    Route("/tasks/{task_id}/retry", retry_task, methods=["POST"]),
    Route("/tasks/{task_id}/assets/{index}/url", asset_url),
    Route("/stats", stats),
]
