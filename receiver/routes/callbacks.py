"""The callback endpoint: check, record durably, answer. Nothing slow happens here."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from receiver import tokens
from receiver._clock import utc_now
from receiver.ledger import Ledger, LedgerUnavailable, Outcome, Update
from receiver.metrics import Metrics
from receiver.models import PayloadError, Source
from receiver.poller import poll_after
from receiver.routes._responses import JSON, error
from receiver.settings import Settings
from receiver.shapes import parse_task
from receiver.webhooks import SignatureError, WebhookKey

__all__ = ["direct", "routes"]

log = logging.getLogger("receiver.callbacks")

# Headers kept with each delivery; anything else (cookies, auth) is not ours to keep.
KEPT_HEADERS = frozenset(
    {
        "content-type",
        "user-agent",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "x-forwarded-for",
        "x-real-ip",
        "x-request-id",
    }
)


# The most of a too-large body read anyway, so that its sender can read the 413.
_DRAIN_BYTES = 16 << 20


class _TooLarge(Exception):
    pass


UNKNOWN_URL = (
    "No callback endpoint at this URL: use a URL printed by "
    "`kling-receiver callback-url` or given at submission."
)


def _refuse(
    request: Request,
    started: float,
    status_code: int,
    code: str,
    message: str,
    **fields: object,
) -> Response:
    """Answers a refused delivery: counted and logged, never recorded."""
    request.app.state.stats.refused[code] += 1
    metrics: Metrics = request.app.state.metrics
    metrics.refused.labels(code).inc()
    metrics.ack_seconds.observe(time.perf_counter() - started)
    remote = request.client.host if request.client else None
    extra = {"outcome": "refused", "reason": code, "remote": remote}
    log.warning("delivery refused", extra=extra | {"latency_ms": _ms(started)} | fields)
    return error(status_code, code, message)


async def unknown(request: Request) -> Response:
    """A POST under /callbacks/ that is no callback URL (often one pasted incompletely)."""
    return _refuse(request, time.perf_counter(), 404, "unknown_callback_url", UNKNOWN_URL)


async def receive(request: Request) -> Response:
    """Authenticate a delivery by its URL (and signature), record it, answer at once."""
    started = time.perf_counter()
    settings: Settings = request.app.state.settings
    remote = request.client.host if request.client else None

    params = request.path_params
    action = f"{params['action']}/{params['action2']}" if "action" in params else None
    ref = tokens.verify(settings.secret("callback_secret"), params["ref"], params["sig"], action)
    if ref is None:
        return _refuse(request, started, 404, "unknown_callback_url", UNKNOWN_URL)

    limit = settings.max_callback_bytes
    try:
        body = await _read_body(request, limit)
    except _TooLarge:
        return _refuse(
            request,
            started,
            413,
            "body_too_large",
            f"The body is larger than the {limit} bytes a callback may have.",
        )
    except ClientDisconnect:  # the sender hung up mid-body: nothing to record, no one to answer
        return _refuse(
            request,
            started,
            400,
            "disconnected",
            "The sender closed the connection before the body ended.",
        )

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    webhook: WebhookKey | None = request.app.state.webhook
    if webhook is not None:
        try:
            if text is None:
                raise SignatureError("the body is not UTF-8 text")
            webhook.verify(request.headers, body)
        except SignatureError as exc:
            return _refuse(
                request,
                started,
                401,
                "bad_signature",
                f"The Standard Webhooks signature does not check out: {exc}.",
            )
    if text is None:
        return _refuse(
            request, started, 400, "bad_json", "The body is not UTF-8 text, so it cannot be JSON."
        )

    try:
        data = json.loads(text)
    except ValueError as exc:
        return _refuse(request, started, 400, "bad_json", f"The body is not valid JSON ({exc}).")
    except RecursionError:
        return _refuse(
            request, started, 400, "bad_json", "The body nests JSON arrays or objects too deeply."
        )
    try:
        task = parse_task(data)
    except PayloadError as exc:
        return _refuse(request, started, 422, "bad_shape", str(exc))

    update = Update(
        task=task,
        body=body,
        source=Source.callback,
        received_at=utc_now(),
        ref=ref,
        headers=_kept_headers(request),
        remote=remote,
        poll_after=poll_after(settings, ref.action),
        confirm=request.app.state.poller is not None and settings.verify,
        archive_watermarked=settings.archive_watermarked,
    )
    ledger: Ledger = request.app.state.ledger
    try:
        applied = await ledger.apply(update)
    except LedgerUnavailable as exc:
        log.error("delivery not recorded", extra={"task_id": task.task_id, "error": str(exc)})
        return error(
            503,
            "ledger_unavailable",
            "The delivery could not be recorded right now; send it again later.",
        )
    if applied.outcome is Outcome.refused:
        return _refuse(
            request, started, 401, "wrong_task", f"Refused: {applied.reason}.", task_id=task.task_id
        )

    request.app.state.stats.deliveries[applied.outcome.value] += 1
    metrics = request.app.state.metrics
    metrics.delivered[applied.outcome].inc()
    if applied.outcome is Outcome.duplicate:
        metrics.duplicates.inc()
    elif applied.outcome is Outcome.kept and task.status is not None:
        metrics.out_of_order.inc()  # a known status that a later one had overtaken
    if applied.assets_created and request.app.state.downloader is not None:
        request.app.state.downloader.wake()
    if applied.outcome is Outcome.held:
        request.app.state.poller.wake()  # confirm it with one query, off this request
    metrics.ack_seconds.observe(time.perf_counter() - started)
    log.info(
        "delivery",
        extra={
            "task_id": task.task_id,
            "status": task.task_status,
            "outcome": applied.outcome.value,
            "task_state": applied.status,
            "assets_created": applied.assets_created,
            "source": Source.callback.value,
            "callback_ref": ref.ref,
            "remote": remote,
            "latency_ms": _ms(started),
        },
    )
    return JSON(
        {
            "ok": True,
            "task_id": task.task_id,
            "outcome": applied.outcome.value,
            "status": applied.status,
        }
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing early when it is (or says it will be) over `limit` bytes.

    A refused body of up to `_DRAIN_BYTES` is read to its end first: a connection closed
    with bytes unread is reset, and the sender would lose the 413 before reading it.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        if declared.isdigit() and int(declared) <= _DRAIN_BYTES:
            await _drain(request, _DRAIN_BYTES)
        raise _TooLarge
    # Read the ASGI messages directly (as Request.stream would): most bodies arrive whole
    # in the first one, which is then taken as it is.
    parts: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if message["type"] != "http.request":
            continue
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            if message.get("more_body", False):
                await _drain(request, _DRAIN_BYTES - size)
            raise _TooLarge
        parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _kept_headers(request: Request) -> dict[str, str]:
    """The KEPT_HEADERS present, each with its first value, in one pass over the headers."""
    kept: dict[str, str] = {}
    for name, value in request.headers.items():
        if name in KEPT_HEADERS and name not in kept:
            kept[name] = value
    return kept


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


_DELIVERY_ROUTES = (
    Route(tokens.CALLBACK_PREFIX + "/{ref}/{sig}/{action}/{action2}", receive, methods=["POST"]),
    Route(tokens.CALLBACK_PREFIX + "/{ref}/{sig}", receive, methods=["POST"]),
)
_PREFIX = tokens.CALLBACK_PREFIX + "/"


def direct(scope: Scope) -> Callable[[Request], Awaitable[Response]] | None:
    """The endpoint for a POST to a callback URL, found without walking the router.

    Only the delivery routes are tried, with their own patterns, so it takes exactly what
    they match and sets the same path parameters (plain strings); anything else returns
    None and goes the usual way, through the router.
    """
    if scope["method"] != "POST" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if not path.startswith(_PREFIX):
        return None
    for route in _DELIVERY_ROUTES:
        match = route.path_regex.match(path)
        if match is not None:
            scope["path_params"] = match.groupdict()
            scope["endpoint"] = receive
            return receive
    return None


routes = [*_DELIVERY_ROUTES, Route("/callbacks/{rest:path}", unknown, methods=["POST"])]


async def _drain(request: Request, budget: int) -> None:
    """Read and drop the rest of a body, up to `budget` bytes (the server bounds the time)."""
    while budget > 0:
        message = await request.receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return
