"""The SQLite ledger backend: the `Ledger` protocol over one WAL-mode SQLite file.

`engine` runs the writer thread and the readers, `schema` holds the tables,
`tasks` and `assets` the SQL of each part. All of the ledger's SQL lives here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from receiver import _rows
from receiver._clock import utc_in, utc_now
from receiver._outbox import replay_in_spans
from receiver._sqlite import assets, dashboard, outbox, polls, tasks
from receiver._sqlite.engine import Engine
from receiver._sqlite.schema import MIGRATIONS
from receiver.ledger import (
    Activity,
    Applied,
    AssetJob,
    AssetResult,
    Backlog,
    DeliveryAttempt,
    DeliveryLog,
    EventDelivery,
    LedgerUnavailable,
    OutboundEvent,
    PollJob,
    ProblemPage,
    Submission,
    TaskPage,
    Update,
)
from receiver.models import AssetState, EventRecord, TaskRecord, TaskStatus
from receiver.rules import decode_cursor, encode_cursor

__all__ = ["MIGRATIONS", "SQLiteLedger"]


class SQLiteLedger(Engine):
    """The ledger in one SQLite file."""

    async def apply(self, update: Update) -> Applied:
        return await self.write(lambda conn: tasks.apply(conn, update))

    async def task(self, task_id: str) -> TaskRecord | None:
        def op(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            return None if row is None else tasks.task_record(conn, row)

        return await self.read(op)

    async def tasks(
        self,
        *,
        status: TaskStatus | None = None,
        archived: bool | None = None,
        limit: int = 50,
        cursor: str | None = None,
        action: str | None = None,
        flagged: bool | None = None,
        since: str | None = None,
        until: str | None = None,
        search: str | None = None,
    ) -> TaskPage:
        before = decode_cursor(cursor)
        where, params = dashboard.task_filter(
            status=status,
            archived=archived,
            action=action,
            flagged=flagged,
            since=since,
            until=until,
            search=search,
            before=before,
        )

        def op(conn: sqlite3.Connection) -> TaskPage:
            rows = conn.execute(
                f"SELECT * FROM tasks WHERE {where} ORDER BY id DESC LIMIT :limit",
                params | {"limit": limit + 1},
            ).fetchall()
            page = [tasks.task_record(conn, row) for row in rows[:limit]]
            more = len(rows) > limit
            return TaskPage(page, encode_cursor(rows[limit - 1]["id"]) if more else None)

        return await self.read(op)

    async def asset_problems(
        self, *, state: AssetState | None = None, limit: int = 50, cursor: str | None = None
    ) -> ProblemPage:
        before = decode_cursor(cursor)
        return await self.read(lambda conn: dashboard.asset_problems(conn, state, limit, before))

    async def activity(self, since: str) -> Activity:
        return await self.read(lambda conn: dashboard.activity(conn, since))

    async def events(self, task_id: str) -> list[EventRecord] | None:
        def op(conn: sqlite3.Connection) -> list[EventRecord] | None:
            task = conn.execute("SELECT id FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if task is None:
                return None
            rows = conn.execute(
                "SELECT * FROM events WHERE task_pk = ? ORDER BY id", (task["id"],)
            ).fetchall()
            return [_rows.event_record(task_id, row) for row in rows]

        return await self.read(op)

    async def claim_asset(self, owner: str, lease_seconds: float) -> AssetJob | None:
        return await self.write(lambda conn: assets.claim(conn, owner, lease_seconds))

    async def renew_lease(self, asset_id: int, owner: str, lease_seconds: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            renewed = conn.execute(
                """UPDATE assets SET lease_expires_at = ?
                   WHERE id = ? AND lease_owner = ? AND state = 'downloading'""",
                (utc_in(lease_seconds), asset_id, owner),
            )
            return renewed.rowcount == 1

        return await self.write(op)

    async def settle_asset(self, asset_id: int, owner: str, result: AssetResult) -> bool:
        return await self.write(lambda conn: assets.settle(conn, asset_id, owner, result))

    async def requeue(self, task_id: str, *, force: bool = False) -> int | None:
        def op(conn: sqlite3.Connection) -> int | None:
            task = conn.execute("SELECT id FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if task is None:
                return None
            now = utc_now()
            # Queued afresh (the files `rules.requeued` names): the retry horizon (counted from
            # created_at) starts again too.
            queued = conn.execute(
                """UPDATE assets SET state = 'pending', next_attempt_at = NULL, attempts = 0,
                                     error = NULL, created_at = ?, updated_at = ?
                   WHERE task_pk = ? AND (state = 'failed' OR (? AND state = 'stored'))""",
                (now, now, task["id"], force),
            ).rowcount
            if queued:
                conn.execute("UPDATE tasks SET archived_at = NULL WHERE id = ?", (task["id"],))
            return queued

        return await self.write(op)

    async def record_submission(
        self,
        action: str,
        params: dict[str, Any],
        external_task_id: str,
        idempotency_key: str | None,
    ) -> tuple[Submission, bool]:
        return await self.write(
            lambda conn: polls.record_submission(
                conn, action, params, external_task_id, idempotency_key
            )
        )

    async def submission(self, external_task_id: str) -> Submission | None:
        return await self.read(lambda conn: polls.submission(conn, external_task_id))

    async def submission_failed(self, external_task_id: str, state: str, error: str) -> None:
        await self.write(lambda conn: polls.submission_failed(conn, external_task_id, state, error))

    async def claim_stale_submissions(
        self, older_than: float, hold_seconds: float
    ) -> list[Submission]:
        return await self.write(
            lambda conn: polls.claim_stale_submissions(conn, older_than, hold_seconds)
        )

    async def track(self, action: str, task_id: str) -> bool:
        return await self.write(lambda conn: polls.track(conn, action, task_id))

    async def claim_polls(self, limit: int, hold_seconds: float) -> list[PollJob]:
        return await self.write(lambda conn: polls.claim_polls(conn, limit, hold_seconds))

    async def poll_failed(self, task_id: str, retry_in: float | None, note: str | None) -> None:
        await self.write(lambda conn: polls.poll_failed(conn, task_id, retry_in, note))

    async def poll_everything_in_flight(self) -> int:
        return await self.write(polls.poll_everything_in_flight)

    async def mark(self, name: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM marks WHERE name = ?", (name,)).fetchone()
            return None if row is None else str(row[0])

        return await self.read(op)

    async def set_mark(self, name: str, value: str) -> None:
        upsert = """INSERT INTO marks (name, value, updated_at) VALUES (?, ?, ?)
                    ON CONFLICT (name) DO UPDATE SET value = excluded.value,
                                                     updated_at = excluded.updated_at"""
        await self.write(lambda conn: conn.execute(upsert, (name, value, utc_now())))

    async def take_turn(self, name: str, owner: str, seconds: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            now = utc_now()
            taken = conn.execute(
                """INSERT INTO turns (name, owner, until) VALUES (?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until
                   WHERE turns.owner = excluded.owner OR turns.until <= ?""",
                (name, owner, utc_in(seconds), now),
            )
            return taken.rowcount == 1

        return await self.write(op)

    async def backlog(self) -> Backlog:
        return await self.read(polls.backlog_of)

    # -- outbound events -------------------------------------------------------------

    async def set_endpoints(self, urls: list[str]) -> None:
        # Read first: a start that changes nothing writes nothing.
        if await self.read(outbox.active_endpoints) != set(urls):
            await self.write(lambda conn: outbox.set_endpoints(conn, urls))

    async def claim_deliveries(
        self, owner: str, lease_seconds: float, limit: int
    ) -> list[EventDelivery]:
        return await self.write(lambda conn: outbox.claim(conn, owner, lease_seconds, limit))

    async def settle_delivery(self, delivery_id: int, owner: str, attempt: DeliveryAttempt) -> bool:
        return await self.write(lambda conn: outbox.settle(conn, delivery_id, owner, attempt))

    async def outbound_events(
        self,
        *,
        after: int | None = None,
        before: int | None = None,
        type: str | None = None,
        task_id: str | None = None,
        limit: int = 50,
    ) -> list[OutboundEvent]:
        return await self.read(
            lambda conn: outbox.events(
                conn, after=after, before=before, type=type, task_id=task_id, limit=limit
            )
        )

    async def delivery_log(self, msg_id: str) -> DeliveryLog | None:
        return await self.read(lambda conn: outbox.delivery_log(conn, msg_id))

    async def replay(
        self,
        since: str,
        types: list[str],
        endpoint: str | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        return await replay_in_spans(
            lambda: self.read(lambda conn: outbox.replay_span(conn, since)),
            lambda after, upto: self.write(
                lambda conn: outbox.replay(conn, since, types, endpoint, after, upto)
            ),
            lambda: self.write(lambda conn: outbox.take_back(conn, endpoint)),
            progress,
        )

    async def warn_expiring(self, created_before: float, limit: int) -> int:
        return await self.write(lambda conn: outbox.warn_expiring(conn, created_before, limit))

    async def stats(self) -> dict[str, int]:
        return await self.read(polls.stats)

    async def ping(self) -> None:
        # The readers answering says nothing of the writer, which records every delivery.
        problem = self.writer_problem
        if problem is not None:
            raise LedgerUnavailable(problem)
        await self.read(lambda conn: conn.execute("SELECT 1").fetchone())
