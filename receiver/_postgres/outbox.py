"""The outbox on PostgreSQL: the statements `receiver._outbox` shares, run with psycopg.

Deliveries are leased in one statement with `FOR UPDATE SKIP LOCKED`, so dispatchers in
many processes never send one twice at once. A task's events are written in the order
its changes commit (every change to a task locks its row first), and a delivery is only
due when none of its task's earlier ones to the same endpoint is still unsent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import psycopg

from receiver import _outbox as sql
from receiver._clock import stamp, utc_in, utc_now
from receiver.events import published
from receiver.ledger import DeliveryAttempt, DeliveryLog, EventDelivery, OutboundEvent
from receiver.rules import AssetExpiring, DomainEvent

__all__ = [
    "claim",
    "delivery_log",
    "events",
    "record",
    "replay",
    "replay_span",
    "set_endpoints",
    "settle",
    "take_back",
    "undelivered",
    "warn_expiring",
]

Row = Mapping[str, Any]
Conn = psycopg.AsyncConnection[Row]

_pg = sql.for_postgres
_INSERT_EVENT = _pg(sql.INSERT_EVENT) + " RETURNING id"
_FAN_OUT = _pg(sql.FAN_OUT)
_TASK = _pg(sql.TASK)
_ASSET = _pg(sql.ASSET)
_CLAIM = _pg(
    f"""WITH due AS (
            SELECT d.id FROM event_deliveries AS d WHERE {sql.DUE}
            ORDER BY d.next_attempt_at, d.id LIMIT :limit FOR UPDATE SKIP LOCKED
        )
        UPDATE event_deliveries SET lease_owner = :owner, lease_expires_at = :until
        FROM due WHERE event_deliveries.id = due.id
        RETURNING event_deliveries.id"""
)
_CLAIMED = _pg(sql.CLAIMED)
_SETTLE = _pg(sql.SETTLE)
_LOG_ATTEMPT = _pg(sql.LOG_ATTEMPT)
_MARK_GONE = _pg(sql.MARK_GONE)
_PUSH_BACK = _pg(sql.PUSH_BACK)
_TAKE_BACK = _pg(sql.TAKE_BACK)
_REPLAY_SPAN = _pg(sql.REPLAY_SPAN)
_EXPIRING = _pg(sql.EXPIRING)
_DELIVERIES = _pg(sql.DELIVERIES)
_ATTEMPTS = _pg(sql.ATTEMPTS)
# Text sorts as SQLite sorts it (bytewise), whatever the database's collation.
_TASK_ASSETS = (
    "SELECT * FROM assets WHERE task_pk = %s"
    ' ORDER BY kind COLLATE "C" DESC, idx, variant COLLATE "C"'
)


async def _one(conn: Conn, query: str, params: Mapping[str, Any]) -> Row:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    assert row is not None
    return row


async def record(conn: Conn, happened: Iterable[DomainEvent], at: str) -> None:
    """Write the outbound events of `happened`, in the caller's transaction."""
    task_docs: dict[str, tuple[Row, list[Row]]] = {}
    for publish in published(happened):
        if publish.asset_pk is None:
            if publish.task_id not in task_docs:
                task = await _one(conn, _TASK, {"task_id": publish.task_id})
                cur = await conn.execute(_TASK_ASSETS, (task["id"],))
                task_docs[publish.task_id] = (task, await cur.fetchall())
            task, assets = task_docs[publish.task_id]
            row = sql.rendered(publish, task, assets, at)
        else:
            asset = await _one(conn, _ASSET, {"asset_pk": publish.asset_pk})
            row = sql.rendered(publish, None, [asset], at)
        event_pk = (await _one(conn, _INSERT_EVENT, row))["id"]
        await conn.execute(_FAN_OUT, {"event_pk": event_pk, "task_id": publish.task_id, "at": at})


async def set_endpoints(conn: Conn, urls: list[str]) -> None:
    cur = await conn.execute(sql.ACTIVE_ENDPOINTS)
    if {row["url"] for row in await cur.fetchall()} == set(urls):
        return  # a start that changes nothing writes nothing
    await conn.execute("UPDATE event_endpoints SET active = 0 WHERE NOT (url = ANY(%s))", (urls,))
    for url in urls:
        await conn.execute(
            """INSERT INTO event_endpoints (url, active, added_at) VALUES (%s, 1, %s)
               ON CONFLICT (url) DO UPDATE SET active = 1""",
            (url, utc_now()),
        )


async def claim(conn: Conn, owner: str, lease_seconds: float, limit: int) -> list[EventDelivery]:
    params = {"now": utc_now(), "limit": limit, "owner": owner, "until": utc_in(lease_seconds)}
    cur = await conn.execute(_CLAIM, params)
    ids = sorted(row["id"] for row in await cur.fetchall())
    return [sql.delivery(await _one(conn, _CLAIMED, {"id": key})) for key in ids]


async def settle(conn: Conn, delivery_id: int, owner: str, attempt: DeliveryAttempt) -> bool:
    params = sql.settle_params(delivery_id, owner, attempt)
    cur = await conn.execute(_SETTLE, params)
    if cur.rowcount != 1:
        return False
    await conn.execute(_LOG_ATTEMPT, params)
    if attempt.state == "gone":
        await conn.execute(_MARK_GONE, params)
    elif attempt.retry_at is not None:
        await conn.execute(_PUSH_BACK, params)
    return True


async def events(
    conn: Conn,
    *,
    after: int | None,
    before: int | None,
    type: str | None,
    task_id: str | None,
    limit: int,
) -> list[OutboundEvent]:
    query, params = sql.page_query(
        after=after, before=before, type=type, task_id=task_id, limit=limit
    )
    cur = await conn.execute(_pg(query), params)
    return [sql.event(row) for row in await cur.fetchall()]


async def delivery_log(conn: Conn, msg_id: str) -> DeliveryLog | None:
    cur = await conn.execute("SELECT * FROM outbox WHERE msg_id = %s", (msg_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    key = {"event_pk": row["id"]}
    deliveries = await (await conn.execute(_DELIVERIES, key)).fetchall()
    attempts = await (await conn.execute(_ATTEMPTS, key)).fetchall()
    return DeliveryLog(sql.event(row), sql.log_entries(deliveries, attempts))


async def replay_span(conn: Conn, since: str) -> tuple[int | None, int | None]:
    cur = await conn.execute(_REPLAY_SPAN, {"since": since})
    row = await cur.fetchone()
    assert row is not None
    return row["first"], row["last"]


async def replay(
    conn: Conn, since: str, types: list[str], endpoint: str | None, after: int, upto: int
) -> int:
    """Replay the events among outbox ids `after` < id <= `upto` (see `sql.replay_in_spans`)."""
    query, due_now, names = sql.replay_query(types)
    params = {"since": since, "endpoint": endpoint, "now": utc_now(), **names}
    params |= {"after": after, "upto": upto}
    await conn.execute(_pg(due_now), params)
    cur = await conn.execute(_pg(query), params)
    return max(cur.rowcount, 0)


async def take_back(conn: Conn, endpoint: str | None) -> None:
    await conn.execute(_TAKE_BACK, {"endpoint": endpoint})


async def warn_expiring(conn: Conn, created_before: float, limit: int) -> int:
    cur = await conn.execute(
        _EXPIRING + " FOR UPDATE OF assets SKIP LOCKED",
        {"before_ms": int(created_before * 1000), "before": stamp(created_before), "limit": limit},
    )
    found = [(row["id"], row["task_id"]) for row in await cur.fetchall()]
    now = utc_now()
    if found:
        await conn.execute(
            "UPDATE assets SET expiry_warned_at = %s WHERE id = ANY(%s)",
            (now, [asset_pk for asset_pk, _ in found]),
        )
    await record(conn, [AssetExpiring(task_id, asset_pk) for asset_pk, task_id in found], now)
    return len(found)


async def undelivered(conn: Conn) -> tuple[int, str | None]:
    row = await _one(conn, _pg(sql.UNDELIVERED), {})
    return int(row["n"]), row["oldest"]
