"""The outbox's SQL and rows, the same for both backends.

Statements are written with `:name` parameters, as sqlite3 takes them; `for_postgres`
turns them into psycopg's `%(name)s`. Only the claim differs between the engines (SQLite
has one writer; PostgreSQL locks with `FOR UPDATE SKIP LOCKED`), so each backend keeps
its own claim.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from receiver import _rows
from receiver._clock import parse_time
from receiver._redact import redact_url
from receiver.documents import task_json
from receiver.events import Publish, asset_document, body, new_msg_id
from receiver.ledger import KLING_KEEPS_SECONDS, DeliveryAttempt, EventDelivery, OutboundEvent

__all__ = [
    "ACTIVE_ENDPOINTS",
    "ASSET",
    "CLAIMED",
    "DUE",
    "DUE_NOW",
    "EXPIRING",
    "FAN_OUT",
    "INSERT_EVENT",
    "LOG_ATTEMPT",
    "MARK_GONE",
    "PUSH_BACK",
    "REPLAY",
    "REPLAY_IDS",
    "REPLAY_SPAN",
    "SETTLE",
    "TASK",
    "UNDELIVERED",
    "delivery",
    "event",
    "for_postgres",
    "log_entries",
    "page_query",
    "rendered",
    "replay_in_spans",
]

INSERT_EVENT = """INSERT INTO outbox (msg_id, type, task_id, body, created_at)
                  VALUES (:msg_id, :type, :task_id, :body, :at)"""
# One delivery per endpoint in use, written with the event.
FAN_OUT = """INSERT INTO event_deliveries (event_pk, endpoint, task_id, state, next_attempt_at,
                                           created_at, updated_at)
             SELECT :event_pk, url, :task_id, 'pending', :at, :at, :at
             FROM event_endpoints WHERE active = 1"""
ACTIVE_ENDPOINTS = "SELECT url FROM event_endpoints WHERE active = 1"
TASK = "SELECT * FROM tasks WHERE task_id = :task_id"
ASSET = """SELECT assets.*, tasks.kling_created_at, tasks.created_at AS task_created_at
           FROM assets JOIN tasks ON tasks.id = assets.task_pk WHERE assets.id = :asset_pk"""
# Due, leased by no one, to an endpoint in use that has not gone, and the oldest unsent
# delivery of its task to its endpoint (so one task's events arrive in order).
DUE = """d.state = 'pending' AND d.next_attempt_at <= :now
         AND (d.lease_expires_at IS NULL OR d.lease_expires_at <= :now)
         AND EXISTS (SELECT 1 FROM event_endpoints AS e
                     WHERE e.url = d.endpoint AND e.active = 1 AND e.gone_at IS NULL)
         AND NOT EXISTS (SELECT 1 FROM event_deliveries AS p
                         WHERE p.endpoint = d.endpoint AND p.task_id = d.task_id
                           AND p.state = 'pending'
                           AND (p.event_pk < d.event_pk OR (p.event_pk = d.event_pk
                                                            AND p.id < d.id)))"""
CLAIMED = """SELECT d.id AS delivery_pk, d.endpoint, d.attempts, o.*
             FROM event_deliveries AS d JOIN outbox AS o ON o.id = d.event_pk
             WHERE d.id = :id"""
SETTLE = """UPDATE event_deliveries
            SET state = :state, attempts = attempts + 1,
                next_attempt_at = coalesce(:retry_at, next_attempt_at),
                lease_owner = NULL, lease_expires_at = NULL, last_status = :status,
                last_error = :error, delivered_at = :delivered_at, updated_at = :at
            WHERE id = :id AND lease_owner = :owner"""
LOG_ATTEMPT = """INSERT INTO event_attempts (delivery_pk, at, status, latency_ms, error, response)
                 VALUES (:id, :at, :status, :latency_ms, :error, :response)"""
# The task's later events to the endpoint wait at least as long as the one retried.
PUSH_BACK = """UPDATE event_deliveries SET next_attempt_at = :retry_at
               WHERE endpoint = (SELECT endpoint FROM event_deliveries WHERE id = :id)
                 AND task_id = (SELECT task_id FROM event_deliveries WHERE id = :id)
                 AND state = 'pending' AND id != :id AND next_attempt_at < :retry_at"""
MARK_GONE = """UPDATE event_endpoints SET gone_at = :at
               WHERE url = (SELECT endpoint FROM event_deliveries WHERE id = :id)"""
REPLAY = """INSERT INTO event_deliveries (event_pk, endpoint, task_id, state, next_attempt_at,
                                           created_at, updated_at)
            SELECT o.id, e.url, o.task_id, 'pending', :now, :now, :now
            FROM outbox AS o, event_endpoints AS e
            WHERE o.id > :after AND o.id <= :upto AND o.created_at >= :since AND e.active = 1
              AND (CAST(:endpoint AS TEXT) IS NULL OR e.url = :endpoint) {types}
            ORDER BY o.id"""
# A replayed event still waiting for a retry to the endpoint is due now as well: its copy
# cannot go before it (a task's deliveries go one at a time, oldest first), so a replay
# would otherwise send nothing until that retry's time, hours away late in the schedule.
DUE_NOW = """UPDATE event_deliveries SET next_attempt_at = :now, updated_at = :now
             WHERE state = 'pending' AND next_attempt_at > :now
               AND (CAST(:endpoint AS TEXT) IS NULL OR endpoint = :endpoint)
               AND event_pk > :after AND event_pk <= :upto
               AND event_pk IN (SELECT o.id FROM outbox AS o
                                WHERE o.id > :after AND o.id <= :upto
                                  AND o.created_at >= :since {types})"""
# The outbox ids a replay since a time covers: it goes through them a span at a time.
REPLAY_SPAN = "SELECT min(id) AS first, max(id) AS last FROM outbox WHERE created_at >= :since"
REPLAY_IDS = 5000  # outbox ids replayed in one transaction: the writer is free between them
TAKE_BACK = """UPDATE event_endpoints SET gone_at = NULL
               WHERE active = 1 AND (CAST(:endpoint AS TEXT) IS NULL OR url = :endpoint)"""
# Unstored files of tasks created before the horizon, not warned of yet.
EXPIRING = """SELECT assets.id, tasks.task_id FROM assets JOIN tasks ON tasks.id = assets.task_pk
              WHERE assets.state IN ('pending', 'downloading', 'failed')
                AND assets.expiry_warned_at IS NULL AND tasks.task_id IS NOT NULL
                AND (tasks.kling_created_at < :before_ms
                     OR (tasks.kling_created_at IS NULL AND tasks.created_at < :before))
              ORDER BY assets.id LIMIT :limit"""
UNDELIVERED = """SELECT count(*) AS n, min(d.created_at) AS oldest FROM event_deliveries AS d
                 JOIN event_endpoints AS e ON e.url = d.endpoint
                 WHERE d.state = 'pending' AND e.active = 1"""

_NAMED = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


def for_postgres(sql: str) -> str:
    """A statement with psycopg's `%(name)s` in place of sqlite3's `:name`."""
    return _NAMED.sub(r"%(\1)s", sql)


def rendered(
    publish: Publish, task: _rows.Row | None, assets: Iterable[_rows.Row], at: str
) -> dict[str, Any]:
    """The outbox row of one event: its task's row and assets, or its asset's row, read now."""
    if publish.asset_pk is None:
        assert task is not None
        data = task_json(_rows.task_record(task, assets))
    else:
        (asset,) = assets
        expires_at = None
        if publish.type == "asset.expiring":
            created = asset["kling_created_at"]
            start = (
                created / 1000
                if created is not None
                else parse_time(asset["task_created_at"]).timestamp()
            )
            expires_at = start + KLING_KEEPS_SECONDS
        data = asset_document(publish.task_id, _rows.asset_record(asset), expires_at)
    return {
        "msg_id": new_msg_id(),
        "type": publish.type,
        "task_id": publish.task_id,
        "body": body(publish.type, at, data),
        "at": at,
    }


def event(row: _rows.Row) -> OutboundEvent:
    return OutboundEvent(
        id=row["id"],
        msg_id=row["msg_id"],
        type=row["type"],
        task_id=row["task_id"],
        created_at=row["created_at"],
        body=bytes(row["body"]),
    )


def delivery(row: _rows.Row) -> EventDelivery:
    """A claimed delivery, from a `CLAIMED` row."""
    return EventDelivery(row["delivery_pk"], row["endpoint"], row["attempts"], event(row))


def settle_params(delivery_id: int, owner: str, attempt: DeliveryAttempt) -> dict[str, Any]:
    return {
        "id": delivery_id,
        "owner": owner,
        "state": "pending" if attempt.state == "gone" else attempt.state,
        "retry_at": attempt.retry_at,
        "status": attempt.status,
        "error": attempt.error,
        "delivered_at": attempt.at if attempt.state == "delivered" else None,
        "at": attempt.at,
        "latency_ms": attempt.latency_ms,
        "response": attempt.response,
    }


def page_query(
    *, after: int | None, before: int | None, type: str | None, task_id: str | None, limit: int
) -> tuple[str, dict[str, Any]]:
    """The statement and parameters of a page of `Ledger.outbound_events`."""
    where = ["1 = 1"]
    if after is not None:
        where.append("id > :after")
    if before is not None:
        where.append("id < :before")
    if type is not None:
        where.append("type = :type")
    if task_id is not None:
        where.append("task_id = :task_id")
    order = "ASC" if after is not None else "DESC"
    sql = f"SELECT * FROM outbox WHERE {' AND '.join(where)} ORDER BY id {order} LIMIT :limit"
    params = {"after": after, "before": before, "type": type, "task_id": task_id, "limit": limit}
    return sql, params


def replay_query(types: list[str]) -> tuple[str, str, dict[str, Any]]:
    """`REPLAY` and `DUE_NOW` narrowed to `types` (every type when empty), and the
    parameters that adds."""
    names = {f"t{i}": name for i, name in enumerate(types)}
    narrowed = f"AND o.type IN ({', '.join(':' + key for key in names)})" if names else ""
    return REPLAY.format(types=narrowed), DUE_NOW.format(types=narrowed), names


DELIVERIES = """SELECT id, endpoint, state, attempts, next_attempt_at, last_status, last_error,
                       delivered_at, created_at
                FROM event_deliveries WHERE event_pk = :event_pk ORDER BY id"""
ATTEMPTS = """SELECT a.delivery_pk, a.at, a.status, a.latency_ms, a.error, a.response
              FROM event_attempts AS a JOIN event_deliveries AS d ON d.id = a.delivery_pk
              WHERE d.event_pk = :event_pk ORDER BY a.id"""


def log_entries(
    deliveries: Iterable[_rows.Row], attempts: Iterable[_rows.Row]
) -> list[dict[str, Any]]:
    """An event's deliveries as the API shows them, each with its attempts, oldest first."""
    tried: dict[int, list[dict[str, Any]]] = {}
    for row in attempts:
        tried.setdefault(row["delivery_pk"], []).append(
            {
                "at": row["at"],
                "status": row["status"],
                "latency_ms": row["latency_ms"],
                "error": row["error"],
                "response": row["response"],
            }
        )
    return [
        {
            "endpoint": redact_url(row["endpoint"]),
            "state": row["state"],
            "attempts": row["attempts"],
            "next_attempt_at": row["next_attempt_at"] if row["state"] == "pending" else None,
            "last_status": row["last_status"],
            "last_error": row["last_error"],
            "delivered_at": row["delivered_at"],
            "created_at": row["created_at"],
            "log": tried.get(row["id"], []),
        }
        for row in deliveries
    ]


async def replay_in_spans(
    span: Callable[[], Awaitable[tuple[int | None, int | None]]],
    replay: Callable[[int, int], Awaitable[int]],
    take_back: Callable[[], Awaitable[None]],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """`EventOutbox.replay`, the same for both backends: the outbox ids since the time
    (`span`), replayed REPLAY_IDS at a time, each span in a transaction of its own (a
    replay of days of events holds the writer a moment at a time, not for seconds), then
    the endpoints taken back. `progress(done, total)` hears of each span, in ids."""
    first, last = await span()
    queued = 0
    if first is not None and last is not None:
        after = first - 1
        while after < last:
            upto = min(after + REPLAY_IDS, last)
            queued += await replay(after, upto)
            after = upto
            if progress is not None:
                progress(after - first + 1, last - first + 1)
    await take_back()
    return queued
