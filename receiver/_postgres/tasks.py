"""Applying updates and reading tasks and their events, on PostgreSQL.

`apply` reads what `rules.decide` needs under locks, calls it and writes the plan it
returns, in the order the SQLite backend writes it: no rule lives here. The locks are
transaction-level advisory locks on every key the delivery names (its task_id and the
external_task_ids of its body and its callback URL), so that two deliveries for the same
task, or racing to create it, run one after the other; and the rows read are locked
`FOR UPDATE`, so that no other writer (the poller, a settling worker) changes them between
the read and the write.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import psycopg

from receiver import _rows
from receiver._clock import epoch_now
from receiver._postgres import outbox
from receiver.ledger import Applied, Outcome, Update
from receiver.models import (
    AssetState,
    KlingTask,
    TaskRecord,
)
from receiver.rules import Known, TaskRow, awaits_confirmation, claimed, decide

__all__ = ["apply", "lock", "task_records"]

Row = Mapping[str, Any]
Conn = psycopg.AsyncConnection[Row]

# What `apply` reads of a task and may write.
_COLUMNS = """id, task_id, external_task_id, action, callback_ref, submission,
              status, status_msg, kling_updated_at, state_digest, terminal_source,
              updates, updated_at, kling_created_at, next_poll_at, quiet_polls, polls,
              verifications, verify_due, flag"""
_BY_TASK_ID = f"SELECT {_COLUMNS} FROM tasks WHERE task_id = %s FOR UPDATE"
_BY_EXTERNAL_TASK_ID = f"SELECT {_COLUMNS} FROM tasks WHERE external_task_id = %s FOR UPDATE"
_WRITTEN = (
    "task_id",
    "external_task_id",
    "action",
    "callback_ref",
    "submission",
    "status",
    "status_msg",
    "kling_updated_at",
    "state_digest",
    "terminal_source",
    "updates",
    "updated_at",
    "kling_created_at",
    "next_poll_at",
    "quiet_polls",
    "polls",
    "verifications",
    "verify_due",
    "flag",
)
_UPDATE_TASK = (
    "UPDATE tasks SET " + ", ".join(f"{name} = %s" for name in _WRITTEN) + " WHERE id = %s"
)
_INSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(_WRITTEN)}, created_at) "
    f"VALUES ({', '.join(['%s'] * (len(_WRITTEN) + 1))}) RETURNING id"
)
_RECORD_EVENT = """INSERT INTO events (task_pk, source, status, body, digest, headers, remote,
                                       received_at, last_received_at, applied, shape)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (task_pk, source, digest) DO NOTHING"""
_COUNT_EVENT = """UPDATE events SET times_received = times_received + 1, last_received_at = %s
                  WHERE task_pk = %s AND source = %s AND digest = %s"""
_GIVE_UP_EXTERNAL_TASK_ID = "UPDATE tasks SET external_task_id = NULL WHERE id = %s"
_DROP_UNSTARTED_ASSETS = "DELETE FROM assets WHERE task_pk = %s AND state IN ('pending', 'failed')"
_INSERT_ASSET = """INSERT INTO assets (task_pk, kind, idx, variant, group_id, url, remote_id,
                                       state, created_at, updated_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (task_pk, kind, idx, variant) DO NOTHING"""
# Text sorts as SQLite sorts it (bytewise), whatever the database's collation.
_ASSET_ORDER = 'kind COLLATE "C" DESC, idx, variant COLLATE "C"'


def lock_key(kind: str, name: str) -> int:
    """The advisory lock of a task key (`task`, `ext`, `idem`): a signed 64-bit number."""
    digest = hashlib.blake2b(f"{kind}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def lock(conn: Conn, keys: Sequence[tuple[str, str | None]]) -> None:
    """Hold the advisory locks of `keys` until the transaction ends, always in one order."""
    numbers = sorted({lock_key(kind, name) for kind, name in keys if name is not None})
    if numbers:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k", (numbers,)
        )


async def apply(conn: Conn, update: Update) -> Applied:
    """Record one delivery and move its task: lock and read what `decide` needs, write its plan."""
    task, ref = update.task, update.ref
    ref_ext = None if ref is None else ref.external_task_id
    await lock(conn, [("task", task.task_id), ("ext", ref_ext), ("ext", task.external_task_id)])
    row = await _fetch_row(conn, _BY_TASK_ID, task.task_id)
    by_ref = await _holding(conn, ref_ext, row)
    holder = None
    if task.external_task_id != ref_ext:
        holder = await _holding(conn, task.external_task_id, row)
    lands_on = row if row is not None else by_ref
    claim = None
    if lands_on is not None and awaits_confirmation(update, lands_on):
        assert lands_on.pk is not None
        claim = await _held_succeed(conn, lands_on.pk)
    known = Known(row, by_ref, holder, claim)
    clock = epoch_now()
    plan = decide(known, update, clock)
    if plan.outcome is Outcome.refused:
        return Applied(Outcome.refused, reason=plan.reason)

    target, now = plan.target, update.received_at
    if plan.give_up is not None:
        await conn.execute(_GIVE_UP_EXTERNAL_TASK_ID, (plan.give_up,))
    if plan.merge is not None:
        assert target is not None and target.pk is not None  # the submission merged into
        await _merge(conn, plan.merge, target.pk)
    if plan.drop_unstarted:
        assert target is not None  # only a stored task is taken over
        await conn.execute(_DROP_UNSTARTED_ASSETS, (target.pk,))
    if target is None:
        # A new task has no deliveries yet, so this one is no duplicate: the row goes in
        # as it ends up (the event needs its id first).
        assert plan.row is not None
        cur = await conn.execute(_INSERT_TASK, (*_values(plan.row), now))
        inserted = await cur.fetchone()
        assert inserted is not None
        pk = int(inserted["id"])
    else:
        assert target.pk is not None
        pk = target.pk
    event = plan.event
    assert event is not None
    source = event.source.value
    cur = await conn.execute(
        _RECORD_EVENT,
        (
            pk,
            source,
            event.status,
            update.body,
            event.digest,
            json.dumps(dict(update.headers)),
            update.remote,
            now,
            now,
            event.applied,
            task.shape,
        ),
    )
    if cur.rowcount != 1:  # the same bytes came before: only counted
        await conn.execute(_COUNT_EVENT, (now, pk, source, event.digest))
        plan = decide(replace(known, seen=True), update, clock)
    if plan.row is not None and (target is not None or plan.outcome is Outcome.duplicate):
        if target is None or _values(plan.row) != _values(target):
            await conn.execute(_UPDATE_TASK, (*_values(plan.row), pk))
    created = 0
    for spec in plan.assets if plan.outcome is Outcome.moved else ():
        cur = await conn.execute(
            _INSERT_ASSET,
            (
                pk,
                spec.kind.value,
                spec.index,
                spec.variant,
                spec.group_id,
                spec.url,
                spec.remote_id,
                AssetState.pending.value,
                now,
                now,
            ),
        )
        created += max(cur.rowcount, 0)
    if plan.happened:
        await outbox.record(conn, plan.happened, now)
    return Applied(plan.outcome, plan.status, assets_created=created)


async def _fetch_row(conn: Conn, query: str, key: str) -> TaskRow | None:
    cur = await conn.execute(query, (key,))
    return _task_row(await cur.fetchone())


async def _holding(conn: Conn, external_task_id: str | None, row: TaskRow | None) -> TaskRow | None:
    """The row that holds `external_task_id`, if any: `row` itself when it does."""
    if external_task_id is None:
        return None
    if row is not None and row.external_task_id == external_task_id:
        return row
    return await _fetch_row(conn, _BY_EXTERNAL_TASK_ID, external_task_id)


async def _merge(conn: Conn, heard_pk: int, submitted_pk: int) -> None:
    """Move a task heard through a hand-made URL into the submission it belongs to."""
    await conn.execute(_DROP_UNSTARTED_ASSETS, (heard_pk,))
    await conn.execute(
        "UPDATE events SET task_pk = %s WHERE task_pk = %s", (submitted_pk, heard_pk)
    )
    await conn.execute(
        "UPDATE assets SET task_pk = %s WHERE task_pk = %s", (submitted_pk, heard_pk)
    )
    await conn.execute("DELETE FROM tasks WHERE id = %s", (heard_pk,))


async def _held_succeed(conn: Conn, pk: int) -> KlingTask | None:
    """The latest succeed callback that waits for confirmation, as the task it claimed."""
    cur = await conn.execute(
        """SELECT body FROM events
           WHERE task_pk = %s AND source = 'callback' AND status = 'succeed' AND NOT applied
           ORDER BY id DESC LIMIT 1""",
        (pk,),
    )
    held = await cur.fetchone()
    return None if held is None else claimed(bytes(held["body"]))


def _task_row(values: Row | None) -> TaskRow | None:
    if values is None:
        return None
    return TaskRow(
        pk=values["id"],
        task_id=values["task_id"],
        external_task_id=values["external_task_id"],
        action=values["action"],
        callback_ref=values["callback_ref"],
        submission=values["submission"],
        status=_rows.status(values["status"]),
        status_msg=values["status_msg"],
        kling_updated_at=values["kling_updated_at"],
        state_digest=values["state_digest"],
        terminal_source=_rows.source(values["terminal_source"]),
        updates=values["updates"],
        updated_at=values["updated_at"],
        kling_created_at=values["kling_created_at"],
        next_poll_at=values["next_poll_at"],
        quiet_polls=values["quiet_polls"],
        polls=values["polls"],
        verifications=values["verifications"],
        verify_due=bool(values["verify_due"]),
        flag=values["flag"],
    )


def _values(row: TaskRow) -> tuple[Any, ...]:
    """A row's values in the order of `_WRITTEN`."""
    return (
        row.task_id,
        row.external_task_id,
        row.action,
        row.callback_ref,
        row.submission,
        None if row.status is None else row.status.value,
        row.status_msg,
        row.kling_updated_at,
        row.state_digest,
        None if row.terminal_source is None else row.terminal_source.value,
        row.updates,
        row.updated_at,
        row.kling_created_at,
        row.next_poll_at,
        row.quiet_polls,
        row.polls,
        row.verifications,
        row.verify_due,
        row.flag,
    )


async def task_records(conn: Conn, rows: Sequence[Row]) -> list[TaskRecord]:
    """The records of these task rows, with their assets (read in one query)."""
    if not rows:
        return []
    cur = await conn.execute(
        f"SELECT * FROM assets WHERE task_pk = ANY(%s) ORDER BY task_pk, {_ASSET_ORDER}",
        ([row["id"] for row in rows],),
    )
    assets: dict[int, list[Row]] = {}
    for asset in await cur.fetchall():
        assets.setdefault(asset["task_pk"], []).append(asset)
    return [_rows.task_record(row, assets.get(row["id"], [])) for row in rows]
