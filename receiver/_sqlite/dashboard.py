"""The dashboard's reads on SQLite: filtered task pages, unstored assets, the overview."""

from __future__ import annotations

import sqlite3
from typing import Any

from receiver import _rows
from receiver.ledger import (
    PROBLEM_STATES,
    UNFINISHED_STATUSES,
    Activity,
    ProblemPage,
    endpoint_health,
)
from receiver.models import AssetState, TaskStatus

__all__ = ["activity", "asset_problems", "task_filter"]

# The oldest unfinished task: the first of each unfinished status on its (status, id) index,
# rather than a sort of every unfinished task.
_OLDEST_UNFINISHED = """
SELECT task_id FROM (
    SELECT * FROM (SELECT id, task_id FROM tasks WHERE status IS NULL AND task_id IS NOT NULL
                   ORDER BY id LIMIT 1) AS unknown
    UNION ALL
    SELECT * FROM (SELECT id, task_id FROM tasks WHERE status = ? AND task_id IS NOT NULL
                   ORDER BY id LIMIT 1) AS first
    UNION ALL
    SELECT * FROM (SELECT id, task_id FROM tasks WHERE status = ? AND task_id IS NOT NULL
                   ORDER BY id LIMIT 1) AS second
) AS oldest ORDER BY id LIMIT 1"""


def task_filter(
    *,
    status: TaskStatus | None,
    archived: bool | None,
    action: str | None,
    flagged: bool | None,
    since: str | None,
    until: str | None,
    search: str | None,
    before: int | None,
) -> tuple[str, dict[str, Any]]:
    """The WHERE clause of a task page and its named parameters: only the filters given,
    so each query can use the index its filter has."""
    where = ["task_id IS NOT NULL"]
    params: dict[str, Any] = {}
    conditions = {
        "status = :status": None if status is None else status.value,
        "(archived_at IS NOT NULL) = :archived": archived,
        "action = :action": action,
        "created_at >= :since": since,
        "created_at < :until": until,
        # Two unique indexes: SQLite looks each up rather than scanning.
        "(task_id = :search OR external_task_id = :search)": search,
        "id < :before": before,
    }
    for condition, value in conditions.items():
        if value is not None:
            where.append(condition)
            params[condition.rsplit(":", 1)[1].rstrip(")")] = value
    if flagged is not None:
        # Written out, not bound, so that "flagged" can use the partial index of flagged tasks.
        where.append("flag IS NOT NULL" if flagged else "flag IS NULL")
    return " AND ".join(where), params


def asset_problems(
    conn: sqlite3.Connection, state: AssetState | None, limit: int, before: int | None
) -> ProblemPage:
    states = [state.value] if state is not None else [s.value for s in PROBLEM_STATES]
    marks = ", ".join("?" for _ in states)
    rows = conn.execute(
        f"""SELECT a.*, t.task_id, t.action FROM assets AS a JOIN tasks AS t ON t.id = a.task_pk
            WHERE a.state IN ({marks}) AND (? IS NULL OR a.id < ?)
            ORDER BY a.id DESC LIMIT ?""",
        (*states, before, before, limit + 1),
    ).fetchall()
    return _rows.problem_page(rows, limit)


def activity(conn: sqlite3.Connection, since: str) -> Activity:
    by_status = conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall()
    learned = conn.execute(
        """SELECT terminal_source, count(*) FROM tasks WHERE terminal_source IS NOT NULL
           GROUP BY terminal_source"""
    ).fetchall()
    minutes = conn.execute(
        """SELECT substr(received_at, 1, 16) AS minute, count(*) FROM events
           WHERE received_at >= ? GROUP BY minute ORDER BY minute""",
        (since,),
    ).fetchall()
    endpoints = conn.execute("SELECT url, active, gone_at FROM event_endpoints ORDER BY url")
    waiting = conn.execute(
        """SELECT endpoint, state, count(*) FROM event_deliveries
           WHERE state IN ('pending', 'failed') GROUP BY endpoint, state"""
    ).fetchall()
    oldest = conn.execute(_OLDEST_UNFINISHED, UNFINISHED_STATUSES).fetchone()
    return Activity(
        oldest_unfinished=None if oldest is None else oldest[0],
        by_status={status or "unknown": count for status, count in by_status},
        learned_from={source: count for source, count in learned},
        per_minute=[(minute, count) for minute, count in minutes],
        endpoints=endpoint_health(
            [tuple(row) for row in endpoints], [tuple(row) for row in waiting]
        ),
    )
