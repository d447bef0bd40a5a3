"""Applying updates and reading tasks and their events: the SQL of the state machine."""

from __future__ import annotations

import base64
import json
import sqlite3
from typing import Any

from receiver._clock import utc_in
from receiver.ledger import (
    Applied,
    Binding,
    Outcome,
    StateKey,
    Update,
    binding_conflict,
    contradiction,
    moves_forward,
    yields_to,
)
from receiver.models import (
    AssetKind,
    AssetRecord,
    AssetState,
    EventRecord,
    KlingTask,
    PayloadError,
    Source,
    TaskRecord,
    TaskStatus,
)
from receiver.shapes import parse_task

__all__ = ["apply", "decode_cursor", "encode_cursor", "event_record", "task_record"]


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
_HOLDER = "SELECT id FROM tasks WHERE external_task_id = ?"
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
    """Record one delivery and move its task: one read of the task, one write of each table.

    The task's row is read once, its new values are worked out here, and it is written
    once (not at all when nothing changes). The writer holds the database's write lock
    from the read to the commit, so nothing else changes the row in between.
    """
    task, ref, now = update.task, update.ref, update.received_at
    task_id = task.task_id
    ref_ext = None if ref is None else ref.external_task_id
    cur = conn.cursor()
    cur.row_factory = None  # plain tuples, read by position
    row = cur.execute(_BY_TASK_ID, (task_id,)).fetchone()
    by_ref = None
    if ref_ext is not None:
        # external_task_id is unique: if the task's own row holds it, no other row does.
        if row is not None and row[_EXTERNAL_TASK_ID] == ref_ext:
            by_ref = row
        else:
            by_ref = cur.execute(_BY_EXTERNAL_TASK_ID, (ref_ext,)).fetchone()
    reason = binding_conflict(ref, task, _binding(row), _binding(by_ref))
    if reason is not None:
        return Applied(Outcome.refused, reason=reason)
    taken_over = yields_to(ref, _binding(row))
    if by_ref is not None and (row is None or row[_ID] != by_ref[_ID]):
        if yields_to(ref, _binding(by_ref)):
            # Another task named this external_task_id through a hand-made URL: the URL
            # made for it outranks that, so the id comes here.
            cur.execute(_GIVE_UP_EXTERNAL_TASK_ID, (by_ref[_ID],))
            by_ref = None
        elif row is None:
            pass  # the submission that made this URL, hearing of its task for the first time
        elif taken_over and by_ref[_TASK_ID] is None:
            # The service's own submission, not yet told its task_id: the task heard
            # through a hand-made URL first becomes part of it.
            _merge(cur, row[_ID], by_ref[_ID])
            row, taken_over = None, False
        else:
            return Applied(
                Outcome.refused, reason="this task is recorded under another external_task_id"
            )

    row = row if row is not None else by_ref
    action = update.effective_action
    external_task_id = task.external_task_id or ref_ext
    if external_task_id is not None:
        # Which task holds this external_task_id: when not refused, a URL made for one task
        # names the same one, so `by_ref` is its holder; else the task's own row may hold it.
        if external_task_id == ref_ext:
            holder = by_ref
        elif row is not None and row[_EXTERNAL_TASK_ID] == external_task_id:
            holder = row
        else:
            holder = cur.execute(_HOLDER, (external_task_id,)).fetchone()
        if holder is not None and (row is None or holder[_ID] != row[_ID]):
            # Unique per Kling account only (a shared URL may serve several): the id stays
            # with its first task and this delivery is still kept, not lost to a UNIQUE error.
            external_task_id = None

    # `before`: the row as it stands (for a new task, as it stands once inserted);
    # `filled`: with what earlier updates could not know filled in, never overwriting.
    if row is None:
        pk = None
        before: list[Any] = [
            None,  # id
            task_id,
            external_task_id,
            action,
            None if ref is None else ref.ref,
            None,  # submission
            None,  # status
            None,  # status_msg
            None,  # kling_updated_at
            None,  # state_digest
            None,  # terminal_source
            0,  # updates
            now,  # updated_at
            task.created_at,
            None,  # next_poll_at
            0,  # quiet_polls
            0,  # polls
            0,  # verifications
            0,  # verify_due
            None,  # flag
        ]
        filled = before
    else:
        pk = row[_ID]
        before = list(row)
        filled = before.copy()
        if filled[_TASK_ID] is None:
            filled[_TASK_ID] = task_id
        if filled[_EXTERNAL_TASK_ID] is None:
            filled[_EXTERNAL_TASK_ID] = external_task_id
        if filled[_ACTION] is None:
            filled[_ACTION] = action
        if filled[_CALLBACK_REF] is None and ref is not None:
            filled[_CALLBACK_REF] = ref.ref
        if filled[_SUBMISSION] == "pending":
            filled[_SUBMISSION] = "accepted"
        if filled[_KLING_CREATED_AT] is None:
            filled[_KLING_CREATED_AT] = task.created_at
        if taken_over:
            assert ref_ext is not None  # only a task's own URL takes over
            _take_over(cur, pk, filled, ref_ext, action)

    # The state as it stands, from `filled`: a take-over has set aside what the
    # hand-made URL's deliveries said.
    digest = update.digest
    status = task.status
    current_status = _status(filled[_STATUS])
    current = None
    if filled[_STATE_DIGEST] is not None:
        current = StateKey(current_status, filled[_KLING_UPDATED_AT], filled[_STATE_DIGEST])
    moved = moves_forward(current, StateKey(status, task.updated_at, digest))
    # Only a task whose action is known can be queried; holding any other would hold it forever.
    queryable = (before[_ACTION] or action) is not None
    held = moved and update.confirm and status is TaskStatus.succeed and queryable
    polled = update.source is Source.poll
    verifying = polled and bool(filled[_VERIFY_DUE])
    flag = None
    if verifying:
        assert pk is not None  # a new task awaits no confirmation
        claimed = _held_succeed(cur, pk)
        flag = None if claimed is None else contradiction(claimed, task)

    def settled(outcome: Outcome) -> list[Any]:
        """The task's row once this delivery is recorded with `outcome`."""
        after = filled.copy()
        state = current_status
        if outcome is not Outcome.duplicate:
            after[_UPDATES] += 1
            after[_UPDATED_AT] = now
        if outcome is Outcome.moved:
            assert status is not None
            state = status
            learned_from = update.source if status.terminal else None
            if learned_from is Source.poll and filled[_VERIFY_DUE] and state is TaskStatus.succeed:
                # The query only confirmed what a held succeed callback said: the callback told us.
                learned_from = Source.callback
            after[_STATUS] = status.value
            after[_STATUS_MSG] = task.task_status_msg
            after[_KLING_UPDATED_AT] = task.updated_at
            after[_STATE_DIGEST] = digest
            after[_TERMINAL_SOURCE] = None if learned_from is None else learned_from.value
        # Poll bookkeeping: count the query, check a held succeed, schedule the next query.
        if outcome is Outcome.held:
            after[_NEXT_POLL_AT] = now  # confirm it now
        elif filled[_VERIFY_DUE] and not verifying:
            # A held succeed still awaits its confirming query: a duplicate must not put it off.
            pass
        elif state is not None and state.terminal:
            after[_NEXT_POLL_AT] = None
        elif update.poll_after is not None:
            after[_NEXT_POLL_AT] = utc_in(update.poll_after)
        quiet = polled and outcome in (Outcome.duplicate, Outcome.kept)
        after[_QUIET_POLLS] = after[_QUIET_POLLS] + 1 if quiet else 0
        after[_POLLS] += polled and not verifying
        after[_VERIFICATIONS] += verifying
        if outcome is Outcome.held:
            after[_VERIFY_DUE] = 1
        elif verifying:
            after[_VERIFY_DUE] = 0
        if flag is not None:
            after[_FLAG] = flag
        return after

    outcome = (Outcome.held if held else Outcome.moved) if moved else Outcome.kept
    if pk is None:
        # A new task has no deliveries yet, so this one is no duplicate: the row goes in
        # as it ends up (the event needs its id first).
        stored = settled(outcome)
        pk = cur.execute(_INSERT_TASK, (*stored[_TASK_ID:], now)).lastrowid
        assert pk is not None
    else:
        stored = before
    source = update.source.value
    recorded = cur.execute(
        _RECORD_EVENT,
        (
            pk,
            source,
            task.task_status if status is None else status.value,
            update.body,
            digest,
            json.dumps(dict(update.headers)),
            update.remote,
            now,
            now,
            moved and not held,
            task.shape,
        ),
    ).rowcount
    if not recorded:  # the same bytes came before: only counted
        cur.execute(_COUNT_EVENT, (now, pk, source, digest))
        outcome = Outcome.duplicate
    if row is not None or outcome is Outcome.duplicate:  # (a new task's only if ids were reused)
        _write_task(cur, pk, stored, settled(outcome), task.created_at)
    if outcome is not Outcome.moved:
        return Applied(outcome, current_status)

    assert status is not None
    created = 0
    if status is TaskStatus.succeed:
        # Terminal states are final, so this runs once per task: the first succeed names the files.
        for spec in task.assets(watermarked=update.archive_watermarked):
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
    return Applied(Outcome.moved, status, assets_created=created)


def _take_over(
    cur: sqlite3.Cursor, pk: int, filled: list[Any], external_task_id: str, action: str | None
) -> None:
    """Bind a task heard through a hand-made URL to its own URL, which outranks that one.

    The URL's external_task_id and action replace what the hand-made URL's deliveries
    said, and so does their state (those deliveries stay in the event log): the state is
    cleared, so this delivery is judged as the first, and files they named that no
    download has begun on are dropped.
    """
    filled[_EXTERNAL_TASK_ID] = external_task_id
    filled[_CALLBACK_REF] = f"x-{external_task_id}"
    filled[_ACTION] = action or filled[_ACTION]
    filled[_STATE] = [None] * len(filled[_STATE])
    filled[_VERIFY_DUE] = 0
    cur.execute(_DROP_UNSTARTED_ASSETS, (pk,))


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
    cur: sqlite3.Cursor, pk: int, stored: list[Any], after: list[Any], created_at: int | None
) -> None:
    """Write the groups of columns in which `after` differs from `stored`, if any."""
    filled = stored[_FILLED] != after[_FILLED]
    state = stored[_STATE] != after[_STATE]
    if not filled and not state and stored[_REST] == after[_REST]:
        return
    values = after[_FILLED] if filled else []
    if state:
        values += after[_STATE]
    values += after[_UPDATES:_KLING_CREATED_AT]
    values.append(created_at)
    values += after[_NEXT_POLL_AT:]
    values.append(pk)
    cur.execute(_UPDATE_TASK[filled][state], values)


def _held_succeed(cur: sqlite3.Cursor, pk: int) -> KlingTask | None:
    """The latest succeed callback that waits for confirmation, as the task it claimed."""
    held = cur.execute(
        """SELECT body FROM events
           WHERE task_pk = ? AND source = 'callback' AND status = 'succeed' AND applied = 0
           ORDER BY id DESC LIMIT 1""",
        (pk,),
    ).fetchone()
    if held is None:
        return None
    try:
        return parse_task(json.loads(held[0]))
    except (ValueError, PayloadError):
        return None


def _binding(row: tuple[Any, ...] | None) -> Binding | None:
    if row is None:
        return None
    return Binding(row[_TASK_ID], row[_EXTERNAL_TASK_ID], row[_CALLBACK_REF])


def _status(value: str | None) -> TaskStatus | None:
    return None if value is None else TaskStatus(value)


def task_record(conn: sqlite3.Connection, row: sqlite3.Row) -> TaskRecord:
    assets = conn.execute(
        "SELECT * FROM assets WHERE task_pk = ? ORDER BY kind DESC, idx, variant", (row["id"],)
    ).fetchall()
    return TaskRecord(
        task_id=row["task_id"],
        action=row["action"],
        status=_status(row["status"]),
        status_msg=row["status_msg"],
        external_task_id=row["external_task_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        kling_updated_at=row["kling_updated_at"],
        terminal_source=_source(row["terminal_source"]),
        updates=row["updates"],
        polls=row["polls"],
        flag=row["flag"],
        archived_at=row["archived_at"],
        assets=tuple(
            AssetRecord(
                kind=AssetKind(asset["kind"]),
                index=asset["idx"],
                variant=asset["variant"],
                group_id=asset["group_id"],
                url=asset["url"],
                state=AssetState(asset["state"]),
                location=asset["location"],
                sha256=asset["sha256"],
                size=asset["size"],
                content_type=asset["content_type"],
                attempts=asset["attempts"],
                error=asset["error"],
                stored_at=asset["stored_at"],
            )
            for asset in assets
        ),
    )


def _source(value: str | None) -> Source | None:
    return None if value is None else Source(value)


def event_record(task_id: str, row: sqlite3.Row) -> EventRecord:
    return EventRecord(
        id=row["id"],
        task_id=task_id,
        source=Source(row["source"]),
        status=row["status"],
        body=row["body"],
        headers=json.loads(row["headers"]),
        remote=row["remote"],
        received_at=row["received_at"],
        last_received_at=row["last_received_at"],
        times_received=row["times_received"],
        applied=bool(row["applied"]),
        shape=row["shape"],
    )


def encode_cursor(pk: int) -> str:
    return base64.urlsafe_b64encode(f"id:{pk}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text.startswith("id:") and 0 < (pk := int(text[3:])) < 2**63:
            return pk  # beyond SQLite's INTEGER, the query itself would fail
    except (ValueError, UnicodeDecodeError):
        pass
    raise ValueError("cursor is not one this service returned")
