"""Applying updates and reading tasks and their events: the SQL of the state machine."""

from __future__ import annotations

import base64
import json
import sqlite3

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
    parse_task,
)

__all__ = ["apply", "decode_cursor", "encode_cursor", "event_record", "task_record"]


def apply(conn: sqlite3.Connection, update: Update) -> Applied:
    task, ref, now = update.task, update.ref, update.received_at
    row = conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task.task_id,)).fetchone()
    by_ref = None
    if ref is not None and ref.external_task_id is not None:
        by_ref = conn.execute(
            "SELECT * FROM tasks WHERE external_task_id = ?", (ref.external_task_id,)
        ).fetchone()
    reason = binding_conflict(ref, task, _binding(row), _binding(by_ref))
    if reason is None and row is not None and by_ref is not None and row["id"] != by_ref["id"]:
        reason = "this task is recorded under another external_task_id"
    if reason is not None:
        return Applied(Outcome.refused, reason=reason)

    row = row if row is not None else by_ref
    external_task_id = task.external_task_id or (ref.external_task_id if ref else None)
    if external_task_id is not None:
        holder = conn.execute(
            "SELECT id FROM tasks WHERE external_task_id = ?", (external_task_id,)
        ).fetchone()
        if holder is not None and (row is None or holder["id"] != row["id"]):
            # Unique per Kling account only (a shared URL may serve several): the id stays
            # with its first task and this delivery is still kept, not lost to a UNIQUE error.
            external_task_id = None
    if row is None:
        pk = conn.execute(
            """INSERT INTO tasks (task_id, external_task_id, action, callback_ref, created_at,
                                  updated_at, kling_created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (
                task.task_id,
                external_task_id,
                update.effective_action,
                ref.ref if ref else None,
                now,
                now,
                task.created_at,
            ),
        ).lastrowid
        row = conn.execute("SELECT * FROM tasks WHERE id = ?", (pk,)).fetchone()
    else:
        # Fill in what earlier updates could not know; never overwrite what is known.
        conn.execute(
            """UPDATE tasks SET task_id = coalesce(task_id, ?),
                                external_task_id = coalesce(external_task_id, ?),
                                action = coalesce(action, ?),
                                callback_ref = coalesce(callback_ref, ?),
                                kling_created_at = coalesce(kling_created_at, ?),
                                submission = CASE WHEN submission = 'pending'
                                             THEN 'accepted' ELSE submission END
               WHERE id = ?""",
            (
                task.task_id,
                external_task_id,
                update.effective_action,
                ref.ref if ref else None,
                task.created_at,
                row["id"],
            ),
        )
    pk = row["id"]

    digest = update.digest
    seen = conn.execute(
        "SELECT id FROM events WHERE task_pk = ? AND source = ? AND digest = ?",
        (pk, update.source.value, digest),
    ).fetchone()
    current_status = _status(row["status"])
    if seen is not None:
        conn.execute(
            """UPDATE events SET times_received = times_received + 1, last_received_at = ?
               WHERE id = ?""",
            (now, seen["id"]),
        )
        _after(conn, row, update, Outcome.duplicate, current_status)
        return Applied(Outcome.duplicate, current_status)

    current = None
    if row["state_digest"] is not None:
        current = StateKey(current_status, row["kling_updated_at"], row["state_digest"])
    moved = moves_forward(current, StateKey(task.status, task.updated_at, digest))
    # Only a task whose action is known can be queried; holding any other would hold it forever.
    queryable = (row["action"] or update.effective_action) is not None
    held = moved and update.confirm and task.status is TaskStatus.succeed and queryable
    conn.execute(
        """INSERT INTO events (task_pk, source, status, body, digest, headers, remote,
                               received_at, last_received_at, applied)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            pk,
            update.source.value,
            task.task_status,
            update.body,
            digest,
            json.dumps(dict(update.headers)),
            update.remote,
            now,
            now,
            moved and not held,
        ),
    )
    conn.execute("UPDATE tasks SET updates = updates + 1, updated_at = ? WHERE id = ?", (now, pk))
    if held or not moved:
        outcome = Outcome.held if held else Outcome.kept
        _after(conn, row, update, outcome, current_status)
        return Applied(outcome, current_status)

    assert task.status is not None
    learned_from = update.source if task.status.terminal else None
    if learned_from is Source.poll and row["verify_due"] and task.status is TaskStatus.succeed:
        # The query only confirmed what a held succeed callback said: the callback told us.
        learned_from = Source.callback
    conn.execute(
        """UPDATE tasks SET status = ?, status_msg = ?, kling_updated_at = ?, state_digest = ?,
                            terminal_source = ?
           WHERE id = ?""",
        (
            task.status.value,
            task.task_status_msg,
            task.updated_at,
            digest,
            None if learned_from is None else learned_from.value,
            pk,
        ),
    )
    created = 0
    if task.status is TaskStatus.succeed:
        # Terminal states are final, so this runs once per task: the first succeed names the files.
        for spec in task.assets():
            created += conn.execute(
                """INSERT OR IGNORE INTO assets (task_pk, kind, idx, url, remote_id, state,
                                                 created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    pk,
                    spec.kind.value,
                    spec.index,
                    spec.url,
                    spec.remote_id,
                    AssetState.pending.value,
                    now,
                    now,
                ),
            ).rowcount
    _after(conn, row, update, Outcome.moved, task.status)
    return Applied(Outcome.moved, task.status, assets_created=created)


def _after(
    conn: sqlite3.Connection,
    row: sqlite3.Row,
    update: Update,
    outcome: Outcome,
    status: TaskStatus | None,
) -> None:
    """Poll bookkeeping: count the query, check a held succeed, schedule the next query."""
    verifying = update.source is Source.poll and bool(row["verify_due"])
    flag = None
    if verifying:
        claimed = _held_succeed(conn, row["id"])
        flag = None if claimed is None else contradiction(claimed, update.task)
    if outcome is Outcome.held:
        next_poll: str | None = update.received_at  # confirm it now
    elif row["verify_due"] and not verifying:
        # A held succeed still awaits its confirming query: a duplicate must not put it off.
        next_poll = row["next_poll_at"]
    elif status is not None and status.terminal:
        next_poll = None
    elif update.poll_after is not None:
        next_poll = utc_in(update.poll_after)
    else:
        next_poll = row["next_poll_at"]
    quiet = outcome in (Outcome.duplicate, Outcome.kept) and update.source is Source.poll
    conn.execute(
        """UPDATE tasks SET next_poll_at = ?,
                            quiet_polls = CASE WHEN ? THEN quiet_polls + 1 ELSE 0 END,
                            polls = polls + ?, verifications = verifications + ?,
                            verify_due = CASE WHEN ? THEN 1 WHEN ? THEN 0 ELSE verify_due END,
                            flag = coalesce(?, flag)
           WHERE id = ?""",
        (
            next_poll,
            quiet,
            update.source is Source.poll and not verifying,
            verifying,
            outcome is Outcome.held,
            verifying,
            flag,
            row["id"],
        ),
    )


def _held_succeed(conn: sqlite3.Connection, pk: int) -> KlingTask | None:
    """The latest succeed callback that waits for confirmation, as the task it claimed."""
    held = conn.execute(
        """SELECT body FROM events
           WHERE task_pk = ? AND source = 'callback' AND status = 'succeed' AND applied = 0
           ORDER BY id DESC LIMIT 1""",
        (pk,),
    ).fetchone()
    if held is None:
        return None
    try:
        return parse_task(json.loads(held["body"]))
    except (ValueError, PayloadError):
        return None


def _binding(row: sqlite3.Row | None) -> Binding | None:
    if row is None:
        return None
    return Binding(row["task_id"], row["external_task_id"], row["callback_ref"])


def _status(value: str | None) -> TaskStatus | None:
    return None if value is None else TaskStatus(value)


def task_record(conn: sqlite3.Connection, row: sqlite3.Row) -> TaskRecord:
    assets = conn.execute(
        "SELECT * FROM assets WHERE task_pk = ? ORDER BY kind DESC, idx", (row["id"],)
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
