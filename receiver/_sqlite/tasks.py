"""Applying updates and reading tasks and their events: the SQL of the state machine."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from typing import Any

from receiver import _rows
from receiver._clock import epoch_now
from receiver._sqlite import outbox
from receiver.ledger import Applied, Outcome, Update
from receiver.models import (
    AssetState,
    KlingTask,
    TaskRecord,
)
from receiver.rules import Known, TaskRow, awaits_confirmation, claimed, decide

__all__ = ["apply", "task_record"]


# What `apply` reads of a task and may write, in this order; positions below name them.
_COLUMNS = """id, task_id, external_task_id, action, callback_ref, submission,
              status, status_msg, kling_updated_at, state_digest, terminal_source,
              updates, updated_at, kling_created_at, next_poll_at, quiet_polls, polls,
              verifications, verify_due, flag"""
_BY_TASK_ID = f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ?"
_BY_EXTERNAL_TASK_ID = f"SELECT {_COLUMNS} FROM tasks WHERE external_task_id = ?"
(
    _ID,
    _TASK_ID,
    _EXTERNAL_TASK_ID,
    _ACTION,
    _CALLBACK_REF,
    _SUBMISSION,
    _STATUS,
    _STATUS_MSG,
    _KLING_UPDATED_AT,
    _STATE_DIGEST,
    _TERMINAL_SOURCE,
    _UPDATES,
    _UPDATED_AT,
    _KLING_CREATED_AT,
    _NEXT_POLL_AT,
    _QUIET_POLLS,
    _POLLS,
    _VERIFICATIONS,
    _VERIFY_DUE,
    _FLAG,
) = range(20)
# The columns in three groups, each written only when one of its values changes (a column
# written rewrites its index entries even when its value stays): what earlier updates could
# not know, the task's state, and the counters and poll bookkeeping that nearly every
# delivery changes.
_FILLED = slice(_TASK_ID, _STATUS)
_STATE = slice(_STATUS, _UPDATES)
_REST = slice(_UPDATES, None)
_SET_FILLED = "task_id = ?, external_task_id = ?, action = ?, callback_ref = ?, submission = ?, "
_SET_STATE = (
    "status = ?, status_msg = ?, kling_updated_at = ?, state_digest = ?, terminal_source = ?, "
)
# kling_created_at is bound on every write, as before, so that SQLite checks the incoming
# value the same way whatever the row holds.
_SET_REST = """updates = ?, updated_at = ?, kling_created_at = coalesce(kling_created_at, ?),
               next_poll_at = ?, quiet_polls = ?, polls = ?, verifications = ?, verify_due = ?,
               flag = ?"""
# Constant texts, so that sqlite3 prepares each once: [filled changed][state changed].
_UPDATE_TASK = [
    [f"UPDATE tasks SET {filled}{state}{_SET_REST} WHERE id = ?" for state in ("", _SET_STATE)]
    for filled in ("", _SET_FILLED)
]
_INSERT_TASK = """INSERT INTO tasks (task_id, external_task_id, action, callback_ref, submission,
                                     status, status_msg, kling_updated_at, state_digest,
                                     terminal_source, updates, updated_at, kling_created_at,
                                     next_poll_at, quiet_polls, polls, verifications, verify_due,
                                     flag, created_at)
                  VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
# A delivery's bytes are kept once per task and source; the same bytes again are counted.
# (RETURNING would say which in one statement, but costs twice what a plain insert does.)
_RECORD_EVENT = """INSERT INTO events (task_pk, source, status, body, digest, headers, remote,
                                       received_at, last_received_at, applied, shape)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (task_pk, source, digest) DO NOTHING"""
_COUNT_EVENT = """UPDATE events SET times_received = times_received + 1, last_received_at = ?
                  WHERE task_pk = ? AND source = ? AND digest = ?"""
_GIVE_UP_EXTERNAL_TASK_ID = "UPDATE tasks SET external_task_id = NULL WHERE id = ?"
_DROP_UNSTARTED_ASSETS = "DELETE FROM assets WHERE task_pk = ? AND state IN ('pending', 'failed')"
_INSERT_ASSET = """INSERT OR IGNORE INTO assets (task_pk, kind, idx, variant, group_id, url,
                                                 remote_id, state, created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""


def apply(conn: sqlite3.Connection, update: Update) -> Applied:
    """Record one delivery and move its task: read what `decide` needs, write its plan.

    The rows the delivery names are read once, and the task's row is written once
    (not at all when nothing changes). The writer holds the database's write lock
    from the reads to the commit, so nothing else changes the rows in between.
    """
    task, ref = update.task, update.ref
    ref_ext = None if ref is None else ref.external_task_id
    cur = conn.cursor()
    cur.row_factory = None  # plain tuples, read by position
    row = _task_row(cur.execute(_BY_TASK_ID, (task.task_id,)).fetchone())
    by_ref = _holding(cur, ref_ext, row)
    holder = None
    if task.external_task_id != ref_ext:
        holder = _holding(cur, task.external_task_id, row)
    lands_on = row if row is not None else by_ref
    claim = None
    if lands_on is not None and awaits_confirmation(update, lands_on):
        assert lands_on.pk is not None
        claim = _held_succeed(cur, lands_on.pk)
    known = Known(row, by_ref, holder, claim)
    clock = epoch_now()
    plan = decide(known, update, clock)
    if plan.outcome is Outcome.refused:
        return Applied(Outcome.refused, reason=plan.reason)

    target, now = plan.target, update.received_at
    if plan.give_up is not None:
        cur.execute(_GIVE_UP_EXTERNAL_TASK_ID, (plan.give_up,))
    if plan.merge is not None:
        assert target is not None and target.pk is not None  # the submission merged into
        _merge(cur, plan.merge, target.pk)
    if plan.drop_unstarted:
        assert target is not None  # only a stored task is taken over
        cur.execute(_DROP_UNSTARTED_ASSETS, (target.pk,))
    if target is None:
        # A new task has no deliveries yet, so this one is no duplicate: the row goes in
        # as it ends up (the event needs its id first).
        assert plan.row is not None
        stored = _values(plan.row)
        pk = cur.execute(_INSERT_TASK, (*stored[_TASK_ID:], now)).lastrowid
        assert pk is not None
    else:
        assert target.pk is not None
        pk, stored = target.pk, _values(target)
    event = plan.event
    assert event is not None
    source = event.source.value
    recorded = cur.execute(
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
    ).rowcount
    if not recorded:  # the same bytes came before: only counted
        cur.execute(_COUNT_EVENT, (now, pk, source, event.digest))
        # The insert is what says so (cheaper than asking first): decide again, knowing it.
        plan = decide(replace(known, seen=True), update, clock)
    # (a new task's row is written again only if ids were reused)
    if plan.row is not None and (target is not None or plan.outcome is Outcome.duplicate):
        _write_task(cur, pk, stored, _values(plan.row), task.created_at)
    created = 0
    for spec in plan.assets if plan.outcome is Outcome.moved else ():
        created += cur.execute(
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
        ).rowcount
    if plan.happened:
        outbox.record(conn, plan.happened, now)
    return Applied(plan.outcome, plan.status, assets_created=created)


def _holding(
    cur: sqlite3.Cursor, external_task_id: str | None, row: TaskRow | None
) -> TaskRow | None:
    """The row that holds `external_task_id`, if any: `row` itself when it does."""
    if external_task_id is None:
        return None
    # external_task_id is unique: if the task's own row holds it, no other row does.
    if row is not None and row.external_task_id == external_task_id:
        return row
    return _task_row(cur.execute(_BY_EXTERNAL_TASK_ID, (external_task_id,)).fetchone())


def _merge(cur: sqlite3.Cursor, heard_pk: int, submitted_pk: int) -> None:
    """Move a task heard through a hand-made URL into the submission it belongs to.

    Its deliveries and begun files go to the submission's row (which has none: it has
    no task_id yet), and its own row goes, freeing the task_id for the submission.
    """
    cur.execute(_DROP_UNSTARTED_ASSETS, (heard_pk,))
    cur.execute("UPDATE events SET task_pk = ? WHERE task_pk = ?", (submitted_pk, heard_pk))
    cur.execute("UPDATE assets SET task_pk = ? WHERE task_pk = ?", (submitted_pk, heard_pk))
    cur.execute("DELETE FROM tasks WHERE id = ?", (heard_pk,))


def _write_task(
    cur: sqlite3.Cursor,
    pk: int,
    stored: tuple[Any, ...],
    after: tuple[Any, ...],
    created_at: int | None,
) -> None:
    """Write the groups of columns in which `after` differs from `stored`, if any."""
    filled = stored[_FILLED] != after[_FILLED]
    state = stored[_STATE] != after[_STATE]
    if not filled and not state and stored[_REST] == after[_REST]:
        return
    values = (
        *(after[_FILLED] if filled else ()),
        *(after[_STATE] if state else ()),
        *after[_UPDATES:_KLING_CREATED_AT],
        created_at,
        *after[_NEXT_POLL_AT:],
        pk,
    )
    cur.execute(_UPDATE_TASK[filled][state], values)


def _held_succeed(cur: sqlite3.Cursor, pk: int) -> KlingTask | None:
    """The latest succeed callback that waits for confirmation, as the task it claimed."""
    held = cur.execute(
        """SELECT body FROM events
           WHERE task_pk = ? AND source = 'callback' AND status = 'succeed' AND applied = 0
           ORDER BY id DESC LIMIT 1""",
        (pk,),
    ).fetchone()
    return None if held is None else claimed(held[0])


def _task_row(values: tuple[Any, ...] | None) -> TaskRow | None:
    """The row `_COLUMNS` read, as the rules take it."""
    if values is None:
        return None
    return TaskRow(
        pk=values[_ID],
        task_id=values[_TASK_ID],
        external_task_id=values[_EXTERNAL_TASK_ID],
        action=values[_ACTION],
        callback_ref=values[_CALLBACK_REF],
        submission=values[_SUBMISSION],
        status=_rows.status(values[_STATUS]),
        status_msg=values[_STATUS_MSG],
        kling_updated_at=values[_KLING_UPDATED_AT],
        state_digest=values[_STATE_DIGEST],
        terminal_source=_rows.source(values[_TERMINAL_SOURCE]),
        updates=values[_UPDATES],
        updated_at=values[_UPDATED_AT],
        kling_created_at=values[_KLING_CREATED_AT],
        next_poll_at=values[_NEXT_POLL_AT],
        quiet_polls=values[_QUIET_POLLS],
        polls=values[_POLLS],
        verifications=values[_VERIFICATIONS],
        verify_due=bool(values[_VERIFY_DUE]),
        flag=values[_FLAG],
    )


def _values(row: TaskRow) -> tuple[Any, ...]:
    """A row's values in the order of `_COLUMNS`, as SQLite stores them."""
    return (
        row.pk,
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
        int(row.verify_due),
        row.flag,
    )


def task_record(conn: sqlite3.Connection, row: sqlite3.Row) -> TaskRecord:
    assets = conn.execute(
        "SELECT * FROM assets WHERE task_pk = ? ORDER BY kind DESC, idx, variant", (row["id"],)
    ).fetchall()
    return _rows.task_record(row, assets)
