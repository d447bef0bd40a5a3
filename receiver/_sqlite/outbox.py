"""The outbox on SQLite: events written with their changes, deliveries leased and settled."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from receiver import _outbox as sql
from receiver._clock import stamp, utc_in, utc_now
from receiver.events import published
from receiver.ledger import DeliveryAttempt, DeliveryLog, EventDelivery, OutboundEvent
from receiver.rules import AssetExpiring, DomainEvent

__all__ = [
    "active_endpoints",
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


def record(conn: sqlite3.Connection, happened: Iterable[DomainEvent], at: str) -> None:
    """Write the outbound events of `happened`, in the caller's transaction.

    A task's document is read once for all of its events: they share the moment.
    """
    task_docs: dict[str, tuple[sqlite3.Row, list[sqlite3.Row]]] = {}
    for publish in published(happened):
        if publish.asset_pk is None:
            if publish.task_id not in task_docs:
                task = conn.execute(sql.TASK, {"task_id": publish.task_id}).fetchone()
                assets = conn.execute(
                    "SELECT * FROM assets WHERE task_pk = ? ORDER BY kind DESC, idx, variant",
                    (task["id"],),
                ).fetchall()
                task_docs[publish.task_id] = (task, assets)
            task, assets = task_docs[publish.task_id]
            row = sql.rendered(publish, task, assets, at)
        else:
            asset = conn.execute(sql.ASSET, {"asset_pk": publish.asset_pk}).fetchone()
            row = sql.rendered(publish, None, [asset], at)
        event_pk = conn.execute(sql.INSERT_EVENT, row).lastrowid
        conn.execute(sql.FAN_OUT, {"event_pk": event_pk, "task_id": publish.task_id, "at": at})


def active_endpoints(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute(sql.ACTIVE_ENDPOINTS)}


def set_endpoints(conn: sqlite3.Connection, urls: list[str]) -> None:
    conn.execute("UPDATE event_endpoints SET active = 0")
    for url in urls:
        conn.execute(
            """INSERT INTO event_endpoints (url, active, added_at) VALUES (?, 1, ?)
               ON CONFLICT (url) DO UPDATE SET active = 1""",
            (url, utc_now()),
        )


def claim(
    conn: sqlite3.Connection, owner: str, lease_seconds: float, limit: int
) -> list[EventDelivery]:
    # The writer thread runs one write at a time: nothing claims between the read and the lease.
    now = utc_now()
    due = conn.execute(
        f"SELECT d.id FROM event_deliveries AS d WHERE {sql.DUE} "
        "ORDER BY d.next_attempt_at, d.id LIMIT :limit",
        {"now": now, "limit": limit},
    ).fetchall()
    until = utc_in(lease_seconds)
    claimed = []
    for (delivery_id,) in due:
        conn.execute(
            "UPDATE event_deliveries SET lease_owner = ?, lease_expires_at = ? WHERE id = ?",
            (owner, until, delivery_id),
        )
        claimed.append(sql.delivery(conn.execute(sql.CLAIMED, {"id": delivery_id}).fetchone()))
    return claimed


def settle(
    conn: sqlite3.Connection, delivery_id: int, owner: str, attempt: DeliveryAttempt
) -> bool:
    params = sql.settle_params(delivery_id, owner, attempt)
    if conn.execute(sql.SETTLE, params).rowcount != 1:
        return False
    conn.execute(sql.LOG_ATTEMPT, params)
    if attempt.state == "gone":
        conn.execute(sql.MARK_GONE, params)
    elif attempt.retry_at is not None:
        conn.execute(sql.PUSH_BACK, params)
    return True


def events(
    conn: sqlite3.Connection,
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
    return [sql.event(row) for row in conn.execute(query, params).fetchall()]


def delivery_log(conn: sqlite3.Connection, msg_id: str) -> DeliveryLog | None:
    row = conn.execute("SELECT * FROM outbox WHERE msg_id = ?", (msg_id,)).fetchone()
    if row is None:
        return None
    key = {"event_pk": row["id"]}
    deliveries = conn.execute(sql.DELIVERIES, key).fetchall()
    attempts = conn.execute(sql.ATTEMPTS, key).fetchall()
    return DeliveryLog(sql.event(row), sql.log_entries(deliveries, attempts))


def replay_span(conn: sqlite3.Connection, since: str) -> tuple[int | None, int | None]:
    first, last = conn.execute(sql.REPLAY_SPAN, {"since": since}).fetchone()
    return first, last


def replay(
    conn: sqlite3.Connection,
    since: str,
    types: list[str],
    endpoint: str | None,
    after: int,
    upto: int,
) -> int:
    """Replay the events among outbox ids `after` < id <= `upto` (see `sql.replay_in_spans`)."""
    query, due_now, names = sql.replay_query(types)
    params = {"since": since, "endpoint": endpoint, "now": utc_now(), **names}
    params |= {"after": after, "upto": upto}
    conn.execute(due_now, params)
    queued: int = conn.execute(query, params).rowcount
    return queued


def take_back(conn: sqlite3.Connection, endpoint: str | None) -> None:
    conn.execute(sql.TAKE_BACK, {"endpoint": endpoint})


def warn_expiring(conn: sqlite3.Connection, created_before: float, limit: int) -> int:
    found = conn.execute(
        sql.EXPIRING,
        {"before_ms": int(created_before * 1000), "before": stamp(created_before), "limit": limit},
    ).fetchall()
    now = utc_now()
    for asset_pk, _ in found:
        conn.execute("UPDATE assets SET expiry_warned_at = ? WHERE id = ?", (now, asset_pk))
    record(conn, [AssetExpiring(task_id, asset_pk) for asset_pk, task_id in found], now)
    return len(found)


def undelivered(conn: sqlite3.Connection) -> tuple[int, str | None]:
    row = conn.execute(sql.UNDELIVERED).fetchone()
    return int(row[0]), row[1]
