"""Outbound events under /api/events: the list, each event's delivery log, replay, and a
live Server-Sent Events stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from receiver._clock import parse_time, wait_for_event
from receiver.events import EVENT_TYPES, BadReplay, replay_request
from receiver.ledger import EventOutbox, OutboundEvent
from receiver.routes._responses import JSON, BadQuery, error, page_limit

__all__ = ["GAP_WAIT", "routes"]

# A stream polls the outbox this often when it has nothing new to send.
STREAM_POLL = 0.5
# A comment line this often keeps idle proxies from closing a quiet stream.
HEARTBEAT = 15.0
# Outbox ids are handed out before commit, so a later id may be visible before an earlier
# one commits: a stream holds back past a gap this long before taking it for a rollback.
GAP_WAIT = 2.0
_BATCH = 100


def _outbox(request: Request) -> EventOutbox:
    outbox: EventOutbox = request.app.state.ledger
    return outbox


def outbound_json(event: OutboundEvent) -> dict[str, Any]:
    """An event as the API shows it: where it is in the outbox, and the body as sent."""
    return {
        "seq": event.id,
        "msg_id": event.msg_id,
        "type": event.type,
        "task_id": event.task_id,
        "created_at": event.created_at,
        "payload": json.loads(event.body),
    }


def _event_type(value: str | None) -> str | None:
    if value in (None, "") or value in EVENT_TYPES:
        return value or None
    raise BadQuery(f"type must be one of {', '.join(EVENT_TYPES)}.")


def _seq(value: str | None, name: str) -> int | None:
    if value in (None, ""):
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise BadQuery(f"{name} must be an event's seq, a whole number.")
    return int(value)


async def list_outbound(request: Request) -> Response:
    """Events newest first; `next_cursor` pages on to older ones."""
    query = request.query_params
    limit = page_limit(query)
    events = await _outbox(request).outbound_events(
        before=_seq(query.get("cursor"), "cursor"),
        type=_event_type(query.get("type")),
        task_id=query.get("task_id") or None,
        limit=limit,
    )
    next_cursor = str(events[-1].id) if len(events) == limit else None
    return JSON({"events": [outbound_json(e) for e in events], "next_cursor": next_cursor})


async def delivery_log(request: Request) -> Response:
    """One event, and for each endpoint it went to, every attempt to send it."""
    msg_id = request.path_params["msg_id"]
    found = await _outbox(request).delivery_log(msg_id)
    if found is None:
        return error(404, "unknown_event", f"No event {msg_id!r} is in the outbox.")
    return JSON(outbound_json(found.event) | {"deliveries": found.deliveries})


async def replay(request: Request) -> Response:
    """Queue past events again: `{"since": TIME or AGE, "types": [...], "endpoint": URL}`."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return error(400, "bad_json", 'The body must be JSON: {"since": "2026-12-01T00:00:00Z"}.')
    try:
        asked = replay_request(
            body.get("since"),
            body.get("types"),
            body.get("endpoint"),
            request.app.state.settings.event_endpoints,
            time.time(),
        )
    except BadReplay as exc:
        return error(422, exc.code, str(exc))
    queued = await _outbox(request).replay(asked.since, asked.types, asked.endpoint)
    return JSON({"since": asked.since, "types": asked.types, "queued": queued})


async def stream(request: Request) -> Response:
    """Server-Sent Events, one per outbox event from now (or after `Last-Event-ID`)."""
    query = request.query_params
    event_type = _event_type(query.get("type"))
    resume = _seq(request.headers.get("last-event-id") or query.get("after"), "Last-Event-ID")
    outbox = _outbox(request)
    if resume is None:
        newest = await outbox.outbound_events(limit=1)
        resume = newest[0].id if newest else 0
    stopping: asyncio.Event = request.app.state.stopping
    frames = _frames(outbox, resume, event_type, query.get("task_id") or None, stopping)
    return StreamingResponse(
        frames,
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


async def _frames(
    outbox: EventOutbox,
    last: int,
    event_type: str | None,
    task_id: str | None,
    stopping: asyncio.Event,
) -> AsyncIterator[bytes]:
    yield f"retry: {int(STREAM_POLL * 4000)}\n\n".encode()
    quiet_since = time.monotonic()
    gap_seen: float | None = None
    while not stopping.is_set():
        events = await outbox.outbound_events(after=last, limit=_BATCH)
        for event in events:
            if event.id != last + 1 and not _gap_closed(event, gap_seen):
                gap_seen = gap_seen or time.monotonic()
                break
            last, gap_seen = event.id, None
            if event_type not in (None, event.type) or task_id not in (None, event.task_id):
                continue
            quiet_since = time.monotonic()
            yield _frame(event)
        if len(events) == _BATCH and gap_seen is None:
            continue
        if time.monotonic() - quiet_since >= HEARTBEAT:
            quiet_since = time.monotonic()
            yield b": keep-alive\n\n"
        # Wakes at once on shutdown, so an open stream does not hold the server's exit.
        await wait_for_event(stopping, STREAM_POLL)


def _gap_closed(event: OutboundEvent, seen: float | None) -> bool:
    """Whether a stream stops waiting for the ids before `event`: they belong to a
    transaction that rolled back, or one open far longer than the ledger's ever are."""
    age = time.time() - parse_time(event.created_at).timestamp()
    return age >= GAP_WAIT or (seen is not None and time.monotonic() - seen >= GAP_WAIT)


def _frame(event: OutboundEvent) -> bytes:
    # The body is one line of JSON (json.dumps escapes newlines), as SSE's data wants.
    data = {"msg_id": event.msg_id, "task_id": event.task_id, **json.loads(event.body)}
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.id}\nevent: {event.type}\ndata: {text}\n\n".encode()


routes = [
    Route("/events", list_outbound, methods=["GET"]),
    Route("/events/stream", stream, methods=["GET"]),
    Route("/events/replay", replay, methods=["POST"]),
    Route("/events/{msg_id}", delivery_log, methods=["GET"]),
]
