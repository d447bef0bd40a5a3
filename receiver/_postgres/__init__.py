"""The PostgreSQL ledger backend: the `Ledger` protocol over one shared PostgreSQL database.

Several receivers and workers on several machines may share it. Each call runs in its own
transaction on a connection of a psycopg_pool.AsyncConnectionPool; the rules are the ones
`receiver.rules` holds, and `tasks.apply` reads what they need under locks. Download jobs
are claimed in one statement with `FOR UPDATE SKIP LOCKED`; the schema migrates at start
under an advisory lock (`schema`). Any database error, a lost connection included, is
`LedgerUnavailable`; deadlocks and serialisation failures are retried first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self, TypeVar

import psycopg
import psycopg_pool
from psycopg import errors
from psycopg.rows import dict_row

from receiver import _rows
from receiver._clock import utc_in, utc_now
from receiver._outbox import replay_in_spans
from receiver._postgres import outbox, tasks, text
from receiver._postgres.schema import MIGRATIONS, migrate
from receiver.ledger import (
    PROBLEM_STATES,
    UNFINISHED_STATUSES,
    UNSTORED_STATES,
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
    backlog,
    endpoint_health,
)
from receiver.models import AssetState, EventRecord, TaskRecord, TaskStatus
from receiver.rules import archived as all_stored
from receiver.rules import decode_cursor, encode_cursor, requeued
from receiver.rules import settled as settled_events

__all__ = ["MIGRATIONS", "PostgresLedger"]

log = logging.getLogger("receiver.ledger")

T = TypeVar("T")
Row = Mapping[str, Any]
Conn = psycopg.AsyncConnection[Row]

# Unfinished, identified and queryable: what the poller may look at (`rules.in_flight`).
_IN_FLIGHT = """task_id IS NOT NULL AND action IS NOT NULL
                AND (status IS NULL OR status IN ('submitted', 'processing') OR verify_due)"""

# The next download job, leased in one statement. Lapsed leases come first (work already
# begun), then new jobs in order, then retries that are due: the same order as SQLite's.
# Each case is a scalar subquery on its own partial index; COALESCE runs the next one only
# when the one before found nothing, and SKIP LOCKED passes over a job another worker is
# claiming this instant, so workers never queue behind one another.
_CLAIM = """
WITH next AS (
    SELECT coalesce(
        (SELECT id FROM assets WHERE state = 'downloading' AND lease_expires_at <= %(now)s
         ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED),
        (SELECT id FROM assets WHERE state = 'pending' AND next_attempt_at IS NULL
         ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED),
        (SELECT id FROM assets WHERE state = 'pending' AND next_attempt_at IS NOT NULL
                                 AND next_attempt_at <= %(now)s
         ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
    ) AS id
)
UPDATE assets SET state = 'downloading', lease_owner = %(owner)s,
                  lease_expires_at = %(until)s, updated_at = %(now)s
FROM next, tasks
WHERE assets.id = next.id AND tasks.id = assets.task_pk
RETURNING assets.*, tasks.task_id, tasks.action, tasks.params"""

# The oldest unfinished task: the first of each unfinished status on its (status, id) index,
# rather than a sort of every unfinished task.
_OLDEST_UNFINISHED = """
SELECT task_id FROM (
    (SELECT id, task_id FROM tasks WHERE status IS NULL AND task_id IS NOT NULL
     ORDER BY id LIMIT 1)
    UNION ALL
    (SELECT id, task_id FROM tasks WHERE status = %s AND task_id IS NOT NULL
     ORDER BY id LIMIT 1)
    UNION ALL
    (SELECT id, task_id FROM tasks WHERE status = %s AND task_id IS NOT NULL
     ORDER BY id LIMIT 1)
) AS oldest ORDER BY id LIMIT 1"""

_CONNECT_TIMEOUT = 5  # seconds, for each new connection
_RECONNECT_GIVE_UP = 5.0  # seconds of failed reconnection before the next call starts afresh
_RETRIED = (errors.DeadlockDetected, errors.SerializationFailure)
_ATTEMPTS = 5


class PostgresLedger:
    """The ledger in one PostgreSQL database, shared by any number of processes."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        open_timeout: float = 10.0,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self._min_size, self._max_size = min_size, max_size
        self._open_timeout, self._timeout = open_timeout, timeout
        self._pool: psycopg_pool.AsyncConnectionPool[Conn] | None = None

    async def __aenter__(self) -> Self:
        try:
            # One connection first: a database that is not there fails at once (the pool
            # would keep trying), and the schema is brought up to date before any work.
            conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT
            )
            async with conn:
                await migrate(conn)
        except psycopg.Error as exc:
            raise LedgerUnavailable(f"cannot open the PostgreSQL database: {_said(exc)}") from exc
        pool: psycopg_pool.AsyncConnectionPool[Conn] = psycopg_pool.AsyncConnectionPool(
            self.url,
            min_size=self._min_size,
            max_size=self._max_size,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "connect_timeout": _CONNECT_TIMEOUT,
            },
            connection_class=psycopg.AsyncConnection[Row],
            configure=_configure,
            # No check on every checkout (a round trip per transaction): a connection the
            # server dropped is found out by its first statement, and `_run` then tries again.
            timeout=self._timeout,
            # While the database is away the pool retries with a doubling delay; giving up
            # after this long lets the next call try at once, so a database that comes back
            # is in use again within seconds, not after a delay grown to minutes.
            reconnect_timeout=_RECONNECT_GIVE_UP,
            open=False,
            name="ledger",
        )
        try:
            await pool.open(wait=True, timeout=self._open_timeout)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, psycopg_pool.PoolTimeout):
                raise LedgerUnavailable(f"cannot open the PostgreSQL database: {exc}") from exc
            raise
        self._pool = pool
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _run(self, op: Callable[[Conn], Awaitable[T]], *, wait: float | None = None) -> T:
        """Run `op` in a transaction of its own; database errors are `LedgerUnavailable`."""
        checked = False
        for attempt in range(_ATTEMPTS):
            pool = self._pool
            if pool is None:
                raise LedgerUnavailable("the ledger is closed")
            conn: Conn | None = None
            try:
                async with pool.connection(timeout=wait) as conn, conn.transaction():
                    return await op(conn)
            except _RETRIED:
                if attempt == _ATTEMPTS - 1:
                    raise LedgerUnavailable("the database kept aborting a transaction") from None
                await asyncio.sleep(0.01 * 2**attempt)
            except psycopg.OperationalError as exc:
                if checked or conn is None or not conn.broken:
                    raise LedgerUnavailable(f"the database refused: {_said(exc)}") from exc
                # The server dropped it (a restart): so it did the other idle ones. Have the
                # pool replace them all, then run `op` again on a live connection.
                checked = True
                await pool.check()
            except psycopg_pool.PoolTimeout as exc:
                raise LedgerUnavailable(f"the database did not answer: {_said(exc)}") from exc
            except psycopg.Error as exc:
                raise LedgerUnavailable(f"the database refused: {_said(exc)}") from exc
        raise AssertionError("unreachable")

    # -- deliveries and tasks ------------------------------------------------------

    async def apply(self, update: Update) -> Applied:
        return await self._run(lambda conn: tasks.apply(conn, update))

    async def task(self, task_id: str) -> TaskRecord | None:
        async def op(conn: Conn) -> TaskRecord | None:
            cur = await conn.execute("SELECT * FROM tasks WHERE task_id = %s", (task_id,))
            row = await cur.fetchone()
            return None if row is None else (await tasks.task_records(conn, [row]))[0]

        return await self._run(op)

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
        conditions: dict[str, object] = {
            "status = %s": None if status is None else status.value,
            "(archived_at IS NOT NULL) = %s": archived,
            "action = %s": action,
            "created_at >= %s": since,
            "created_at < %s": until,
            "id < %s": before,
        }
        where = ["task_id IS NOT NULL"]
        params: list[object] = []
        for condition, value in conditions.items():
            if value is not None:
                where.append(condition)
                params.append(value)
        if flagged is not None:
            # Written out, not bound, so that "flagged" can use the partial index of flagged tasks.
            where.append("flag IS NOT NULL" if flagged else "flag IS NULL")
        if search is not None:
            where.append("(task_id = %s OR external_task_id = %s)")
            params += [search, search]

        async def op(conn: Conn) -> TaskPage:
            cur = await conn.execute(
                f"SELECT * FROM tasks WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %s",
                (*params, limit + 1),
            )
            rows = await cur.fetchall()
            page = await tasks.task_records(conn, rows[:limit])
            more = len(rows) > limit
            return TaskPage(page, encode_cursor(rows[limit - 1]["id"]) if more else None)

        return await self._run(op)

    async def asset_problems(
        self, *, state: AssetState | None = None, limit: int = 50, cursor: str | None = None
    ) -> ProblemPage:
        before = decode_cursor(cursor)
        states = [state.value] if state is not None else [s.value for s in PROBLEM_STATES]

        async def op(conn: Conn) -> ProblemPage:
            cur = await conn.execute(
                """SELECT a.*, t.task_id, t.action
                   FROM assets AS a JOIN tasks AS t ON t.id = a.task_pk
                   WHERE a.state = ANY(%s) AND (%s::bigint IS NULL OR a.id < %s)
                   ORDER BY a.id DESC LIMIT %s""",
                (states, before, before, limit + 1),
            )
            rows = await cur.fetchall()
            return _rows.problem_page(rows, limit)

        return await self._run(op)

    async def activity(self, since: str) -> Activity:
        async def op(conn: Conn) -> Activity:
            cur = await conn.execute("SELECT status, count(*) AS n FROM tasks GROUP BY status")
            by_status = {r["status"] or "unknown": int(r["n"]) for r in await cur.fetchall()}
            cur = await conn.execute(
                """SELECT terminal_source, count(*) AS n FROM tasks
                   WHERE terminal_source IS NOT NULL GROUP BY terminal_source"""
            )
            learned = {r["terminal_source"]: int(r["n"]) for r in await cur.fetchall()}
            cur = await conn.execute(
                """SELECT substr(received_at, 1, 16) AS minute, count(*) AS n FROM events
                   WHERE received_at >= %s GROUP BY minute ORDER BY minute""",
                (since,),
            )
            minutes = [(r["minute"], int(r["n"])) for r in await cur.fetchall()]
            cur = await conn.execute(
                "SELECT url, active, gone_at FROM event_endpoints ORDER BY url"
            )
            endpoints = [(r["url"], r["active"], r["gone_at"]) for r in await cur.fetchall()]
            cur = await conn.execute(
                """SELECT endpoint, state, count(*) AS n FROM event_deliveries
                   WHERE state IN ('pending', 'failed') GROUP BY endpoint, state"""
            )
            waiting = [(r["endpoint"], r["state"], r["n"]) for r in await cur.fetchall()]
            cur = await conn.execute(_OLDEST_UNFINISHED, UNFINISHED_STATUSES)
            oldest = await cur.fetchone()
            return Activity(
                by_status,
                learned,
                minutes,
                endpoint_health(endpoints, waiting),
                oldest_unfinished=None if oldest is None else oldest["task_id"],
            )

        return await self._run(op)

    async def events(self, task_id: str) -> list[EventRecord] | None:
        async def op(conn: Conn) -> list[EventRecord] | None:
            cur = await conn.execute("SELECT id FROM tasks WHERE task_id = %s", (task_id,))
            task = await cur.fetchone()
            if task is None:
                return None
            cur = await conn.execute(
                "SELECT * FROM events WHERE task_pk = %s ORDER BY id", (task["id"],)
            )
            return [_rows.event_record(task_id, row) for row in await cur.fetchall()]

        return await self._run(op)

    # -- the asset queue -------------------------------------------------------------

    async def claim_asset(self, owner: str, lease_seconds: float) -> AssetJob | None:
        async def op(conn: Conn) -> AssetJob | None:
            cur = await conn.execute(
                _CLAIM, {"now": utc_now(), "owner": owner, "until": utc_in(lease_seconds)}
            )
            row = await cur.fetchone()
            return None if row is None else _rows.asset_job(row)

        return await self._run(op)

    async def renew_lease(self, asset_id: int, owner: str, lease_seconds: float) -> bool:
        async def op(conn: Conn) -> bool:
            cur = await conn.execute(
                """UPDATE assets SET lease_expires_at = %s
                   WHERE id = %s AND lease_owner = %s AND state = 'downloading'""",
                (utc_in(lease_seconds), asset_id, owner),
            )
            return cur.rowcount == 1

        return await self._run(op)

    async def settle_asset(self, asset_id: int, owner: str, result: AssetResult) -> bool:
        async def op(conn: Conn) -> bool:
            now = utc_now()
            # The task's row is locked first: two workers storing a task's last two files
            # then decide one after the other, and the second sees the first's file stored.
            cur = await conn.execute(
                """SELECT tasks.id, tasks.task_id, tasks.archived_at
                   FROM tasks JOIN assets ON assets.task_pk = tasks.id
                   WHERE assets.id = %s FOR UPDATE OF tasks""",
                (asset_id,),
            )
            task = await cur.fetchone()
            if task is None:
                return False
            cur = await conn.execute(
                """UPDATE assets SET state = %s, error = %s, next_attempt_at = %s,
                                     attempts = attempts + %s,
                                     lease_owner = NULL, lease_expires_at = NULL,
                                     location = coalesce(%s, location),
                                     sha256 = coalesce(%s, sha256), size = coalesce(%s, size),
                                     content_type = coalesce(%s, content_type),
                                     stored_at = coalesce(%s, stored_at), updated_at = %s
                   WHERE id = %s AND lease_owner = %s AND state = 'downloading'""",
                (*_rows.settled(result), now, asset_id, owner),
            )
            if cur.rowcount != 1:
                return False
            archived_now = False
            if result.state is AssetState.stored and task["archived_at"] is None:
                cur = await conn.execute(
                    "SELECT state FROM assets WHERE task_pk = %s", (task["id"],)
                )
                if all_stored(AssetState(row["state"]) for row in await cur.fetchall()):
                    await conn.execute(
                        "UPDATE tasks SET archived_at = %s WHERE id = %s", (now, task["id"])
                    )
                    archived_now = True
            if result.state is not AssetState.pending:
                happened = settled_events(
                    task["task_id"], asset_id, result.state, archived_now=archived_now
                )
                await outbox.record(conn, happened, now)
            return True

        return await self._run(op)

    async def requeue(self, task_id: str, *, force: bool = False) -> int | None:
        async def op(conn: Conn) -> int | None:
            cur = await conn.execute(
                "SELECT id FROM tasks WHERE task_id = %s FOR UPDATE", (task_id,)
            )
            task = await cur.fetchone()
            if task is None:
                return None
            cur = await conn.execute(
                "SELECT id, state FROM assets WHERE task_pk = %s FOR UPDATE", (task["id"],)
            )
            chosen = [
                row["id"]
                for row in await cur.fetchall()
                if requeued(AssetState(row["state"]), force=force)
            ]
            if not chosen:
                return 0
            now = utc_now()
            # Queued afresh: the retry horizon (counted from created_at) starts again too.
            await conn.execute(
                """UPDATE assets SET state = 'pending', next_attempt_at = NULL, attempts = 0,
                                     error = NULL, created_at = %s, updated_at = %s
                   WHERE id = ANY(%s)""",
                (now, now, chosen),
            )
            await conn.execute("UPDATE tasks SET archived_at = NULL WHERE id = %s", (task["id"],))
            return len(chosen)

        return await self._run(op)

    # -- submissions and polling -----------------------------------------------------

    async def record_submission(
        self,
        action: str,
        params: dict[str, Any],
        external_task_id: str,
        idempotency_key: str | None,
    ) -> tuple[Submission, bool]:
        async def op(conn: Conn) -> tuple[Submission, bool]:
            await tasks.lock(conn, [("idem", idempotency_key), ("ext", external_task_id)])
            if idempotency_key is not None:
                cur = await conn.execute(
                    "SELECT * FROM tasks WHERE idempotency_key = %s", (idempotency_key,)
                )
                known = await cur.fetchone()
                if known is not None:
                    return _rows.submission(known), False
            now = utc_now()
            cur = await conn.execute(
                """INSERT INTO tasks (external_task_id, action, callback_ref, params, submission,
                                      idempotency_key, created_at, updated_at)
                   VALUES (%s, %s, %s, %s, 'pending', %s, %s, %s) RETURNING *""",
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
            row = await cur.fetchone()
            assert row is not None
            return _rows.submission(row), True

        return await self._run(op)

    async def submission(self, external_task_id: str) -> Submission | None:
        async def op(conn: Conn) -> Submission | None:
            cur = await conn.execute(
                "SELECT * FROM tasks WHERE external_task_id = %s AND submission IS NOT NULL",
                (external_task_id,),
            )
            row = await cur.fetchone()
            return None if row is None else _rows.submission(row)

        return await self._run(op)

    async def submission_failed(self, external_task_id: str, state: str, error: str) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                """UPDATE tasks SET submission = %s, submit_error = %s, updated_at = %s
                   WHERE external_task_id = %s AND submission = 'pending'""",
                (state, error, utc_now(), external_task_id),
            )

        await self._run(op)

    async def claim_stale_submissions(
        self, older_than: float, hold_seconds: float
    ) -> list[Submission]:
        async def op(conn: Conn) -> list[Submission]:
            # A pending submission has no task to poll yet, so its next_poll_at holds the claim.
            cur = await conn.execute(
                """UPDATE tasks SET next_poll_at = %s
                   WHERE id IN (SELECT id FROM tasks
                                WHERE submission = 'pending' AND task_id IS NULL
                                AND created_at <= %s
                                AND (next_poll_at IS NULL OR next_poll_at <= %s)
                                ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
                   RETURNING *""",
                (utc_in(hold_seconds), utc_in(-older_than), utc_now()),
            )
            rows = sorted(await cur.fetchall(), key=lambda row: row["id"])
            return [_rows.submission(row) for row in rows]

        return await self._run(op)

    async def track(self, action: str, task_id: str) -> bool:
        async def op(conn: Conn) -> bool:
            await tasks.lock(conn, [("task", task_id)])
            now = utc_now()
            cur = await conn.execute("SELECT id FROM tasks WHERE task_id = %s", (task_id,))
            known = await cur.fetchone()
            if known is not None:
                await conn.execute(
                    """UPDATE tasks SET action = coalesce(action, %s), next_poll_at = %s,
                                        polls_since = %s
                       WHERE id = %s
                         AND (status IS NULL OR status IN ('submitted', 'processing'))""",
                    (action, now, now, known["id"]),
                )
                return False
            await conn.execute(
                """INSERT INTO tasks (task_id, action, next_poll_at, created_at, updated_at)
                   VALUES (%s, %s, %s, %s, %s)""",
                (task_id, action, now, now, now),
            )
            return True

        return await self._run(op)

    async def claim_polls(self, limit: int, hold_seconds: float) -> list[PollJob]:
        async def op(conn: Conn) -> list[PollJob]:
            # Tasks another poller is claiming this instant are passed over, not waited for.
            cur = await conn.execute(
                f"""UPDATE tasks SET next_poll_at = %s
                    FROM (SELECT id, next_poll_at AS due FROM tasks
                          WHERE {_IN_FLIGHT} AND next_poll_at <= %s
                          ORDER BY next_poll_at LIMIT %s FOR UPDATE SKIP LOCKED) AS claimed
                    WHERE tasks.id = claimed.id
                    RETURNING tasks.*, claimed.due""",
                (utc_in(hold_seconds), utc_now(), limit),
            )
            rows = sorted(await cur.fetchall(), key=lambda row: (row["due"], row["id"]))
            return [
                PollJob(
                    task_id=row["task_id"],
                    action=row["action"],
                    quiet_polls=row["quiet_polls"],
                    verify=bool(row["verify_due"]),
                    created_at=row["polls_since"] or row["created_at"],
                )
                for row in rows
            ]

        return await self._run(op)

    async def poll_failed(self, task_id: str, retry_in: float | None, note: str | None) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                """UPDATE tasks SET next_poll_at = %s, status_msg = coalesce(%s, status_msg)
                   WHERE task_id = %s""",
                (None if retry_in is None else utc_in(retry_in), note, task_id),
            )

        await self._run(op)

    async def poll_everything_in_flight(self) -> int:
        async def op(conn: Conn) -> int:
            cur = await conn.execute(
                f"UPDATE tasks SET next_poll_at = %s WHERE {_IN_FLIGHT}", (utc_now(),)
            )
            return max(cur.rowcount, 0)

        return await self._run(op)

    # -- marks, turns, counters --------------------------------------------------------

    async def mark(self, name: str) -> str | None:
        async def op(conn: Conn) -> str | None:
            cur = await conn.execute("SELECT value FROM marks WHERE name = %s", (name,))
            row = await cur.fetchone()
            return None if row is None else str(row["value"])

        return await self._run(op)

    async def set_mark(self, name: str, value: str) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                """INSERT INTO marks (name, value, updated_at) VALUES (%s, %s, %s)
                   ON CONFLICT (name) DO UPDATE SET value = excluded.value,
                                                    updated_at = excluded.updated_at""",
                (name, value, utc_now()),
            )

        await self._run(op)

    async def take_turn(self, name: str, owner: str, seconds: float) -> bool:
        async def op(conn: Conn) -> bool:
            cur = await conn.execute(
                """INSERT INTO turns (name, owner, until) VALUES (%s, %s, %s)
                   ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,
                                                    until = excluded.until
                   WHERE turns.owner = excluded.owner OR turns.until <= %s""",
                (name, owner, utc_in(seconds), utc_now()),
            )
            return cur.rowcount == 1

        return await self._run(op)

    async def backlog(self) -> Backlog:
        async def op(conn: Conn) -> Backlog:
            statuses = list(UNFINISHED_STATUSES)
            states = [state.value for state in UNSTORED_STATES]
            cur = await conn.execute(
                """SELECT status, count(*) AS n, min(created_at) AS oldest FROM tasks
                   WHERE task_id IS NOT NULL AND (status IS NULL OR status = ANY(%s))
                   GROUP BY status""",
                (statuses,),
            )
            tasks = [(r["status"], int(r["n"]), r["oldest"]) for r in await cur.fetchall()]
            cur = await conn.execute(
                """SELECT state, count(*) AS n, min(created_at) AS oldest FROM assets
                   WHERE state = ANY(%s) GROUP BY state""",
                (states,),
            )
            assets = [(r["state"], int(r["n"]), r["oldest"]) for r in await cur.fetchall()]
            cur = await conn.execute(
                """SELECT min(t.kling_created_at) AS kling_created,
                          min(CASE WHEN t.kling_created_at IS NULL THEN t.created_at END)
                              AS created
                   FROM assets AS a JOIN tasks AS t ON t.id = a.task_pk
                   WHERE a.state = ANY(%s)""",
                (states,),
            )
            row = await cur.fetchone()
            assert row is not None
            undelivered = await outbox.undelivered(conn)
            return backlog(tasks, assets, row["kling_created"], row["created"], undelivered)

        return await self._run(op)

    # -- outbound events -------------------------------------------------------------

    async def set_endpoints(self, urls: list[str]) -> None:
        await self._run(lambda conn: outbox.set_endpoints(conn, urls))

    async def claim_deliveries(
        self, owner: str, lease_seconds: float, limit: int
    ) -> list[EventDelivery]:
        return await self._run(lambda conn: outbox.claim(conn, owner, lease_seconds, limit))

    async def settle_delivery(self, delivery_id: int, owner: str, attempt: DeliveryAttempt) -> bool:
        return await self._run(lambda conn: outbox.settle(conn, delivery_id, owner, attempt))

    async def outbound_events(
        self,
        *,
        after: int | None = None,
        before: int | None = None,
        type: str | None = None,
        task_id: str | None = None,
        limit: int = 50,
    ) -> list[OutboundEvent]:
        return await self._run(
            lambda conn: outbox.events(
                conn, after=after, before=before, type=type, task_id=task_id, limit=limit
            )
        )

    async def delivery_log(self, msg_id: str) -> DeliveryLog | None:
        return await self._run(lambda conn: outbox.delivery_log(conn, msg_id))

    async def replay(
        self,
        since: str,
        types: list[str],
        endpoint: str | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        return await replay_in_spans(
            lambda: self._run(lambda conn: outbox.replay_span(conn, since)),
            lambda after, upto: self._run(
                lambda conn: outbox.replay(conn, since, types, endpoint, after, upto)
            ),
            lambda: self._run(lambda conn: outbox.take_back(conn, endpoint)),
            progress,
        )

    async def warn_expiring(self, created_before: float, limit: int) -> int:
        return await self._run(lambda conn: outbox.warn_expiring(conn, created_before, limit))

    async def stats(self) -> dict[str, int]:
        async def op(conn: Conn) -> dict[str, int]:
            cur = await conn.execute(
                """SELECT coalesce(sum(polls), 0) AS polls,
                          coalesce(sum(verifications), 0) AS verifications,
                          count(*) FILTER (WHERE terminal_source = 'poll') AS recovered_by_polling,
                          count(*) FILTER (WHERE terminal_source = 'sweep') AS recovered_by_sweep,
                          count(*) FILTER (WHERE flag IS NOT NULL) AS flagged
                   FROM tasks"""
            )
            row = await cur.fetchone()
            assert row is not None
            return {name: int(value) for name, value in row.items()}

        return await self._run(op)

    async def ping(self) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute("SELECT 1")

        await self._run(op, wait=min(self._timeout, 2.0))


async def _configure(conn: Conn) -> None:
    """Each new connection of the pool keeps strings as SQLite does (see `text`)."""
    text.register(conn)


def _said(exc: BaseException) -> str:
    """What an error says, on one line (never the URL: psycopg leaves out the password)."""
    return " ".join(str(exc).split()) or type(exc).__name__
