"""Outbound events: which domain events are published, how their bodies look, when to retry.

Pure functions, shared by both ledger backends (which write events into the outbox in
the transaction of the change that caused them) and the dispatcher (which sends them).
A body is Standard Webhooks' shape, `{"type", "timestamp", "data"}`, with the task (or
the asset and its `task_id`) as the API shows it at the moment of the change; it is
written once and sent byte for byte on every attempt and replay.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from receiver._clock import age_seconds, stamp
from receiver._redact import redact_url
from receiver.documents import asset_json
from receiver.models import AssetRecord
from receiver.rules import (
    AssetExpiring,
    AssetFailed,
    AssetStored,
    DomainEvent,
    TaskArchived,
    TaskFailed,
    TaskFlagged,
    TaskStatusChanged,
)

__all__ = [
    "EVENT_TYPES",
    "MAX_RETRY_AFTER",
    "SCHEDULE",
    "BadReplay",
    "Publish",
    "Replay",
    "asset_document",
    "body",
    "new_msg_id",
    "next_delay",
    "published",
    "replay_request",
]

EVENT_TYPES = (
    "task.updated",
    "task.failed",
    "task.flagged",
    "task.archived",
    "asset.stored",
    "asset.failed",
    "asset.expiring",
)
# Seconds before each attempt, counted from the one before: Standard Webhooks' schedule
# (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h), about a day and a quarter in all.
SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
JITTER = 0.1  # each wait is stretched or shrunk by up to this share, so retries spread out
# An endpoint asking to be left alone longer than this is tried again after this long anyway.
MAX_RETRY_AFTER = 3600.0

_TYPES: dict[type, str] = {
    TaskStatusChanged: "task.updated",
    TaskFailed: "task.failed",
    TaskFlagged: "task.flagged",
    TaskArchived: "task.archived",
    AssetStored: "asset.stored",
    AssetFailed: "asset.failed",
    AssetExpiring: "asset.expiring",
}


@dataclass(frozen=True, slots=True)
class Publish:
    """An event to write: its type, its task, and the asset it is about (None: the task)."""

    type: str
    task_id: str
    asset_pk: int | None = None


def published(happened: Iterable[DomainEvent]) -> list[Publish]:
    """The outbound events of these domain events, in order; the rest stay inside."""
    found = []
    for event in happened:
        name = _TYPES.get(type(event))
        if name is not None:
            asset_pk = getattr(event, "asset_pk", None)
            found.append(Publish(name, event.task_id, asset_pk))
    return found


def asset_document(
    task_id: str, asset: AssetRecord, expires_at: float | None = None
) -> dict[str, Any]:
    """An asset event's `data`: the asset as the API shows it, with its task_id (and, for
    `asset.expiring`, when Kling deletes the file)."""
    data = {"task_id": task_id, **asset_json(asset)}
    if expires_at is not None:
        data["expires_at"] = stamp(expires_at)
    return data


def body(event_type: str, timestamp: str, data: dict[str, Any]) -> bytes:
    """The bytes of an event as they are signed and sent."""
    document = {"type": event_type, "timestamp": timestamp, "data": data}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def new_msg_id() -> str:
    """A `webhook-id`: unique, and the same for every attempt and replay of the event."""
    return f"msg_{uuid.uuid4().hex}"


def next_delay(
    attempts: int, retry_after: float | None = None, rand: float | None = None
) -> float | None:
    """Seconds until the attempt after `attempts` finished ones; None once the schedule is over.

    An endpoint's Retry-After is honoured when it asks for longer, up to `MAX_RETRY_AFTER`.
    """
    if attempts >= len(SCHEDULE):
        return None
    share = random.random() if rand is None else rand
    delay = SCHEDULE[attempts] * (1 - JITTER + 2 * JITTER * share)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


@dataclass(frozen=True, slots=True)
class Replay:
    """Which past events to send again: written since `since`, of `types` (all when
    empty), to `endpoint` (every endpoint in use when None)."""

    since: str
    types: list[str]
    endpoint: str | None


class BadReplay(ValueError):
    """A replay request that cannot be carried out; `code` names what is wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def replay_request(
    since: object, types: object, endpoint: object, endpoints: list[str], now: float
) -> Replay:
    """A checked replay, from what a person asked for: `since` is a time with its zone
    (2026-12-01T00:00:00Z) or an age back from `now` (30d, 12h, 90m); `endpoint`, when
    given, is one of `endpoints`."""
    start = _since(since, now)
    if start is None:
        raise BadReplay(
            "bad_since",
            "since must be a time with its zone (2026-12-01T00:00:00Z) or an age (30d, 12h, 90m).",
        )
    chosen = [] if types is None else types
    if not isinstance(chosen, list) or not all(t in EVENT_TYPES for t in chosen):
        raise BadReplay("bad_types", f"types must be a list of {', '.join(EVENT_TYPES)}.")
    if endpoint is not None and endpoint not in endpoints:
        named = ", ".join(redact_url(url) for url in endpoints) or "none is set"
        raise BadReplay(
            "unknown_endpoint", f"endpoint must be one of EVENT_WEBHOOK_URLS ({named})."
        )
    return Replay(start, list(dict.fromkeys(chosen)), endpoint)


def _since(value: object, now: float) -> str | None:
    """A replay's start, written as the outbox writes times."""
    if not isinstance(value, str) or not value:
        return None
    age = age_seconds(value)
    if age is not None:
        return stamp(now - age)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return stamp(moment.astimezone(UTC).timestamp())
