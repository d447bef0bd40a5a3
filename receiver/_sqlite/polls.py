"""Submissions recorded before Kling answers, and the poller's schedule."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from receiver import _rows
from receiver._clock import utc_in, utc_now
from receiver._sqlite import outbox
from receiver.ledger import (
    UNFINISHED_STATUSES,
    UNSTORED_STATES,
    Backlog,
    PollJob,
    Submission,
    backlog,
)

__all__ = [
    "backlog_of",
    "claim_polls",
    "claim_stale_submissions",
    "poll_everything_in_flight",
    "poll_failed",
    "record_submission",
    "stats",
    "submission",
    "submission_failed",
    "track",
]

# Pending past a cutoff and not held by another process's reconciliation round.
_STALE = """submission = 'pending' AND task_id IS NULL AND created_at <= ?
            AND (next_poll_at IS NULL OR next_poll_at <= ?)"""
# Unfinished, identified and queryable: what the poller may look at (`rules.in_flight`).
_IN_FLIGHT = """task_id IS NOT NULL AND action IS NOT NULL
                AND (status IS NULL OR status IN ('submitted', 'processing') OR verify_due = 1)"""


def record_submission(
    conn: sqlite3.Connection,
    action: str,
    params: dict[str, Any],
    external_task_id: str,
    idempotency_key: str | None,
) -> tuple[Submission, bool]:
    if idempotency_key is not None:
        known = conn.execute(
            "SELECT * FROM tasks WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone()
        if known is not None:
            return _rows.submission(known), False
    now = utc_now()
    conn.execute(
        """INSERT INTO tasks (external_task_id, action, callback_ref, params, submission,
                              idempotency_key, created_at, updated_at)
           VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)""",
        (
            external_task_id,
            action,
            f"x-{external_task_id}",
            json.dumps(params),
            idempotency_key,
            now,
            now,
        ),
    )
    found = submission(conn, external_task_id)
    assert found is not None
    return found, True


def submission(conn: sqlite3.Connection, external_task_id: str) -> Submission | None:
    row = conn.execute(
        "SELECT * FROM tasks WHERE external_task_id = ? AND submission IS NOT NULL",
        (external_task_id,),
    ).fetchone()
    return None if row is None else _rows.submission(row)


def submission_failed(
    conn: sqlite3.Connection, external_task_id: str, state: str, error: str
) -> None:
    conn.execute(
        """UPDATE tasks SET submission = ?, submit_error = ?, updated_at = ?
           WHERE external_task_id = ? AND submission = 'pending'""",
        (state, error, utc_now(), external_task_id),
    )


def claim_stale_submissions(
    conn: sqlite3.Connection, older_than: float, hold_seconds: float
) -> list[Submission]:
    # A pending submission has no task to poll yet, so its next_poll_at holds the claim.
    rows = conn.execute(
        f"""UPDATE tasks SET next_poll_at = ? WHERE id IN (SELECT id FROM tasks WHERE {_STALE}
            ORDER BY id LIMIT 100) RETURNING *""",
        (utc_in(hold_seconds), utc_in(-older_than), utc_now()),
    ).fetchall()
    return [_rows.submission(row) for row in sorted(rows, key=lambda row: row["id"])]


def track(conn: sqlite3.Connection, action: str, task_id: str) -> bool:
    now = utc_now()
    known = conn.execute("SELECT id FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
    if known is not None:
        conn.execute(
            """UPDATE tasks SET action = coalesce(action, ?), next_poll_at = ?, polls_since = ?
               WHERE id = ? AND (status IS NULL OR status IN ('submitted', 'processing'))""",
            (action, now, now, known["id"]),
        )
        return False
    conn.execute(
        """INSERT INTO tasks (task_id, action, next_poll_at, created_at, updated_at)
           VALUES (?, ?, ?, ?, ?)""",
        (task_id, action, now, now, now),
    )
    return True


def claim_polls(conn: sqlite3.Connection, limit: int, hold_seconds: float) -> list[PollJob]:
    rows = conn.execute(
        f"""SELECT * FROM tasks WHERE {_IN_FLIGHT} AND next_poll_at <= ?
            ORDER BY next_poll_at LIMIT ?""",
        (utc_now(), limit),
    ).fetchall()
    held_until = utc_in(hold_seconds)
    jobs = []
    for row in rows:
        conn.execute("UPDATE tasks SET next_poll_at = ? WHERE id = ?", (held_until, row["id"]))
        jobs.append(
            PollJob(
                task_id=row["task_id"],
                action=row["action"],
                quiet_polls=row["quiet_polls"],
                verify=bool(row["verify_due"]),
                created_at=row["polls_since"] or row["created_at"],
            )
        )
    return jobs


def poll_failed(
    conn: sqlite3.Connection, task_id: str, retry_in: float | None, note: str | None
) -> None:
    conn.execute(
        """UPDATE tasks SET next_poll_at = ?, status_msg = coalesce(?, status_msg)
           WHERE task_id = ?""",
        (None if retry_in is None else utc_in(retry_in), note, task_id),
    )


def poll_everything_in_flight(conn: sqlite3.Connection) -> int:
    return conn.execute(
        f"UPDATE tasks SET next_poll_at = ? WHERE {_IN_FLIGHT}",
        (utc_now(),),
    ).rowcount


def stats(conn: sqlite3.Connection) -> dict[str, int]:
    row = conn.execute(
        """SELECT coalesce(sum(polls), 0) AS polls,
                  coalesce(sum(verifications), 0) AS verifications,
                  coalesce(sum(terminal_source = 'poll'), 0) AS recovered_by_polling,
                  coalesce(sum(terminal_source = 'sweep'), 0) AS recovered_by_sweep,
                  coalesce(sum(flag IS NOT NULL), 0) AS flagged
           FROM tasks"""
    ).fetchone()
    return dict(row)


def backlog_of(conn: sqlite3.Connection) -> Backlog:
    # Bound lists rather than literals, so the sets stay the ones `receiver.ledger` names.
    statuses = {"s1": UNFINISHED_STATUSES[0], "s2": UNFINISHED_STATUSES[1]}
    states = {f"a{i}": state.value for i, state in enumerate(UNSTORED_STATES)}
    tasks = conn.execute(
        """SELECT status, count(*), min(created_at) FROM tasks
           WHERE task_id IS NOT NULL AND (status IS NULL OR status IN (:s1, :s2))
           GROUP BY status""",
        statuses,
    ).fetchall()
    assets = conn.execute(
        """SELECT state, count(*), min(created_at) FROM assets
           WHERE state IN (:a0, :a1, :a2) GROUP BY state""",
        states,
    ).fetchall()
    expiry = conn.execute(
        """SELECT min(t.kling_created_at),
                  min(CASE WHEN t.kling_created_at IS NULL THEN t.created_at END)
           FROM assets AS a JOIN tasks AS t ON t.id = a.task_pk
           WHERE a.state IN (:a0, :a1, :a2)""",
        states,
    ).fetchone()
    return backlog(
        [tuple(row) for row in tasks],
        [tuple(row) for row in assets],
        expiry[0],
        expiry[1],
        outbox.undelivered(conn),
    )
