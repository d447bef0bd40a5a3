"""Stored rows into records, the same for every backend.

Both backends read rows that answer `row["column"]` (sqlite3.Row, psycopg's dict
rows) from tables with the same columns, so one function per record serves both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from receiver.ledger import AssetJob, AssetProblem, AssetResult, ProblemPage, Submission
from receiver.models import (
    AssetKind,
    AssetRecord,
    AssetState,
    EventRecord,
    Source,
    TaskRecord,
    TaskStatus,
)
from receiver.rules import encode_cursor

__all__ = [
    "asset_job",
    "asset_record",
    "event_record",
    "problem_page",
    "settled",
    "source",
    "status",
    "submission",
    "task_record",
]


class Row(Protocol):
    def __getitem__(self, column: str, /) -> Any: ...


def status(value: str | None) -> TaskStatus | None:
    return None if value is None else TaskStatus(value)


def source(value: str | None) -> Source | None:
    return None if value is None else Source(value)


def task_record(row: Row, assets: Iterable[Row]) -> TaskRecord:
    """A task as the API shows it, from its row and its assets' rows (in their order)."""
    return TaskRecord(
        task_id=row["task_id"],
        action=row["action"],
        status=status(row["status"]),
        status_msg=row["status_msg"],
        external_task_id=row["external_task_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        kling_updated_at=row["kling_updated_at"],
        terminal_source=source(row["terminal_source"]),
        updates=row["updates"],
        polls=row["polls"],
        flag=row["flag"],
        archived_at=row["archived_at"],
        assets=tuple(asset_record(asset) for asset in assets),
    )


def asset_record(asset: Row) -> AssetRecord:
    """An asset as the API shows it, from its row."""
    return AssetRecord(
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


def event_record(task_id: str, row: Row) -> EventRecord:
    """One distinct delivery of a task, as it came."""
    return EventRecord(
        id=row["id"],
        task_id=task_id,
        source=Source(row["source"]),
        status=row["status"],
        body=bytes(row["body"]),
        headers=json.loads(row["headers"]),
        remote=row["remote"],
        received_at=row["received_at"],
        last_received_at=row["last_received_at"],
        times_received=row["times_received"],
        applied=bool(row["applied"]),
        shape=row["shape"],
    )


def asset_job(row: Row) -> AssetJob:
    """A claimed download, from its asset's row joined with its task's id, action and params."""
    return AssetJob(
        asset_id=row["id"],
        task_id=row["task_id"],
        action=row["action"],
        kind=AssetKind(row["kind"]),
        index=row["idx"],
        variant=row["variant"],
        group_id=row["group_id"],
        url=row["url"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        expected_sha256=row["sha256"],
        task_params=None if row["params"] is None else json.loads(row["params"]),
    )


def submission(row: Row) -> Submission:
    """A task the service submitted, from its row."""
    return Submission(
        external_task_id=row["external_task_id"],
        action=row["action"],
        params=json.loads(row["params"]) if row["params"] else {},
        state=row["submission"],
        task_id=row["task_id"],
        error=row["submit_error"],
        created_at=row["created_at"],
    )


def settled(result: AssetResult) -> tuple[Any, ...]:
    """What settling an attempt writes, in the order both backends' UPDATE names it.

    State, error, next attempt, attempts added, then location, sha256, size, content
    type and stored_at (each kept as it was when the result has none).
    """
    return (
        result.state.value,
        result.error,
        result.retry_at,
        int(result.count_attempt),
        result.location,
        result.sha256,
        result.size,
        result.content_type,
        result.stored_at,
    )


def problem_page(rows: Sequence[Row], limit: int) -> ProblemPage:
    """A page of `Ledger.asset_problems` from up to `limit + 1` rows of assets joined with
    their task's `task_id` and `action`, newest first (the extra row says there is more)."""
    problems = [
        AssetProblem(
            id=row["id"],
            task_id=row["task_id"],
            action=row["action"],
            asset=asset_record(row),
            updated_at=row["updated_at"],
        )
        for row in rows[:limit]
    ]
    more = len(rows) > limit
    return ProblemPage(problems, encode_cursor(rows[limit - 1]["id"]) if more else None)
