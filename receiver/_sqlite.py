"""The SQLite ledger backend: WAL, one writer thread with group commit, pooled readers.

Every write goes through one thread that takes whatever writes are waiting,
runs each in its own savepoint inside one transaction and commits them together,
so a burst of deliveries costs one fsync rather than one each. Readers use their
own connections and never wait for the writer. Several processes may share the
file: SQLite's lock serialises their writers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from receiver._clock import utc_in, utc_now
from receiver.ledger import (
    Applied,
    AssetJob,
    AssetResult,
    Binding,
    LedgerUnavailable,
    Outcome,
    StateKey,
    TaskPage,
    Update,
    binding_conflict,
    moves_forward,
)
from receiver.models import (
    AssetKind,
    AssetRecord,
    AssetState,
    EventRecord,
    Source,
    TaskRecord,
    TaskStatus,
)

__all__ = ["SQLiteLedger"]

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]
_MAX_BATCH = 512

# Each entry moves the schema one version forward; never edit one that has shipped.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY,
            task_id TEXT UNIQUE,
            external_task_id TEXT UNIQUE,
            action TEXT,
            callback_ref TEXT,
            status TEXT,
            status_msg TEXT,
            kling_created_at INTEGER,
            kling_updated_at INTEGER,
            state_digest TEXT,
            terminal_source TEXT,
            params TEXT,
            updates INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            archived_at TEXT
        )""",
        "CREATE INDEX tasks_status ON tasks (status, id)",
        "CREATE INDEX tasks_callback_ref ON tasks (callback_ref)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            task_pk INTEGER NOT NULL REFERENCES tasks (id),
            source TEXT NOT NULL,
            status TEXT NOT NULL,
            body BLOB NOT NULL,
            digest TEXT NOT NULL,
            headers TEXT NOT NULL,
            remote TEXT,
            received_at TEXT NOT NULL,
            last_received_at TEXT NOT NULL,
            times_received INTEGER NOT NULL DEFAULT 1,
            applied INTEGER NOT NULL,
            UNIQUE (task_pk, digest)
        )""",
        """CREATE TABLE assets (
            id INTEGER PRIMARY KEY,
            task_pk INTEGER NOT NULL REFERENCES tasks (id),
            kind TEXT NOT NULL,
            idx INTEGER NOT NULL,
            url TEXT NOT NULL,
            remote_id TEXT,
            state TEXT NOT NULL,
            location TEXT,
            sha256 TEXT,
            size INTEGER,
            content_type TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            lease_owner TEXT,
            lease_expires_at TEXT,
            next_attempt_at TEXT,
            stored_at TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (task_pk, kind, idx)
        )""",
        "CREATE INDEX assets_queue ON assets (state, next_attempt_at)",
    ],
]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    # FULL: a delivery acknowledged with 200 survives power loss too; group commit pays for it.
    conn.execute("PRAGMA synchronous = FULL")
    return conn


class SQLiteLedger:
    """The ledger in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[tuple[_Op, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []

    async def __aenter__(self) -> SQLiteLedger:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = await asyncio.to_thread(self._open_writer)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerUnavailable(f"cannot open the database at {self.path}: {exc}") from exc
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="ledger-writer", daemon=True
        )
        self._writer.start()
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ledger-reader")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._writer is not None:
            self._queue.put(None)  # drains what is queued, then stops
            await asyncio.to_thread(self._writer.join)
        if self._readers is not None:
            # Forget the pool first: a read after closing is LedgerUnavailable, not RuntimeError.
            readers, self._readers = self._readers, None
            readers.shutdown(wait=True)
        for conn in self._reader_conns:
            conn.close()

    # -- writing -------------------------------------------------------------

    def _open_writer(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number:d}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        return conn

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[tuple[_Op, asyncio.Future[Any]]]
    ) -> None:
        results: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((op(conn), None))
                    conn.execute("RELEASE op")
                except Exception as exc:  # one bad write must not sink the batch
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((None, exc))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = LedgerUnavailable(f"the database refused a write: {exc}")
            results = [(None, failure)] * len(batch)
        for (_, future), (value, error) in zip(batch, results, strict=True):
            future.get_loop().call_soon_threadsafe(_settle, future, value, error)

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None or not self._writer.is_alive():
            raise LedgerUnavailable("the ledger is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((op, future))
        return await future

    # -- reading -------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
            self._reader_conns.append(conn)
        return conn

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._reader()
            conn.execute("BEGIN")  # one snapshot for all the queries of a read
            try:
                return op(conn)
            finally:
                conn.execute("COMMIT")

        if self._readers is None:
            raise LedgerUnavailable("the ledger is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers, run)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"the database did not answer: {exc}") from exc

    # -- the Ledger protocol ---------------------------------------------------

    async def apply(self, update: Update) -> Applied:
        return await self._write(lambda conn: _apply(conn, update))

    async def task(self, task_id: str) -> TaskRecord | None:
        def op(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            return None if row is None else _task_record(conn, row)

        return await self._read(op)

    async def tasks(
        self,
        *,
        status: TaskStatus | None = None,
        archived: bool | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        before = _decode_cursor(cursor)

        def op(conn: sqlite3.Connection) -> TaskPage:
            rows = conn.execute(
                """SELECT * FROM tasks
                   WHERE task_id IS NOT NULL
                     AND (:status IS NULL OR status = :status)
                     AND (:archived IS NULL OR (archived_at IS NOT NULL) = :archived)
                     AND (:before IS NULL OR id < :before)
                   ORDER BY id DESC LIMIT :limit""",
                {
                    "status": None if status is None else status.value,
                    "archived": archived,
                    "before": before,
                    "limit": limit + 1,
                },
            ).fetchall()
            page = [_task_record(conn, row) for row in rows[:limit]]
            more = len(rows) > limit
            return TaskPage(page, _encode_cursor(rows[limit - 1]["id"]) if more else None)

        return await self._read(op)

    async def events(self, task_id: str) -> list[EventRecord] | None:
        def op(conn: sqlite3.Connection) -> list[EventRecord] | None:
            task = conn.execute("SELECT id FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if task is None:
                return None
            rows = conn.execute(
                "SELECT * FROM events WHERE task_pk = ? ORDER BY id", (task["id"],)
            ).fetchall()
            return [_event_record(task_id, row) for row in rows]

        return await self._read(op)

    async def claim_asset(self, owner: str, lease_seconds: float) -> AssetJob | None:
        return await self._write(lambda conn: _claim(conn, owner, lease_seconds))

    async def renew_lease(self, asset_id: int, owner: str, lease_seconds: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            renewed = conn.execute(
                """UPDATE assets SET lease_expires_at = ?
                   WHERE id = ? AND lease_owner = ? AND state = 'downloading'""",
                (utc_in(lease_seconds), asset_id, owner),
            )
            return renewed.rowcount == 1

        return await self._write(op)

    async def settle_asset(self, asset_id: int, owner: str, result: AssetResult) -> bool:
        return await self._write(lambda conn: _settle_asset(conn, asset_id, owner, result))

    async def requeue(self, task_id: str, *, force: bool = False) -> int | None:
        def op(conn: sqlite3.Connection) -> int | None:
            task = conn.execute("SELECT id FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if task is None:
                return None
            now = utc_now()
            # Queued afresh: the retry horizon (counted from created_at) starts again too.
            queued = conn.execute(
                """UPDATE assets SET state = 'pending', next_attempt_at = NULL, attempts = 0,
                                     error = NULL, created_at = ?, updated_at = ?
                   WHERE task_pk = ? AND (state = 'failed' OR (? AND state = 'stored'))""",
                (now, now, task["id"], force),
            ).rowcount
            if queued:
                conn.execute("UPDATE tasks SET archived_at = NULL WHERE id = ?", (task["id"],))
            return queued

        return await self._write(op)

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _apply(conn: sqlite3.Connection, update: Update) -> Applied:
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
                                kling_created_at = coalesce(kling_created_at, ?)
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
        "SELECT id FROM events WHERE task_pk = ? AND digest = ?", (pk, digest)
    ).fetchone()
    current_status = _status(row["status"])
    if seen is not None:
        conn.execute(
            """UPDATE events SET times_received = times_received + 1, last_received_at = ?
               WHERE id = ?""",
            (now, seen["id"]),
        )
        return Applied(Outcome.duplicate, current_status)

    current = None
    if row["state_digest"] is not None:
        current = StateKey(current_status, row["kling_updated_at"], row["state_digest"])
    incoming = StateKey(task.status, task.updated_at, digest)
    moved = moves_forward(current, incoming)
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
            moved,
        ),
    )
    conn.execute("UPDATE tasks SET updates = updates + 1, updated_at = ? WHERE id = ?", (now, pk))
    if not moved:
        return Applied(Outcome.kept, current_status)

    assert task.status is not None
    conn.execute(
        """UPDATE tasks SET status = ?, status_msg = ?, kling_updated_at = ?, state_digest = ?,
                            terminal_source = ?
           WHERE id = ?""",
        (
            task.status.value,
            task.task_status_msg,
            task.updated_at,
            digest,
            update.source.value if task.status.terminal else None,
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
    return Applied(Outcome.moved, task.status, assets_created=created)


def _claim(conn: sqlite3.Connection, owner: str, lease_seconds: float) -> AssetJob | None:
    now = utc_now()
    row = conn.execute(
        """SELECT assets.*, tasks.task_id, tasks.action, tasks.params FROM assets
           JOIN tasks ON tasks.id = assets.task_pk
           WHERE (assets.state = 'pending'
                  AND (assets.next_attempt_at IS NULL OR assets.next_attempt_at <= :now))
              OR (assets.state = 'downloading' AND assets.lease_expires_at <= :now)
           ORDER BY assets.next_attempt_at IS NOT NULL, assets.next_attempt_at, assets.id
           LIMIT 1""",
        {"now": now},
    ).fetchone()
    if row is None:
        return None
    conn.execute(
        """UPDATE assets SET state = 'downloading', lease_owner = ?, lease_expires_at = ?,
                             updated_at = ?
           WHERE id = ?""",
        (owner, utc_in(lease_seconds), now, row["id"]),
    )
    return AssetJob(
        asset_id=row["id"],
        task_id=row["task_id"],
        action=row["action"],
        kind=AssetKind(row["kind"]),
        index=row["idx"],
        url=row["url"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        expected_sha256=row["sha256"],
        task_params=None if row["params"] is None else json.loads(row["params"]),
    )


def _settle_asset(conn: sqlite3.Connection, asset_id: int, owner: str, result: AssetResult) -> bool:
    now = utc_now()
    settled = conn.execute(
        """UPDATE assets SET state = ?, error = ?, next_attempt_at = ?, attempts = attempts + ?,
                             lease_owner = NULL, lease_expires_at = NULL,
                             location = coalesce(?, location), sha256 = coalesce(?, sha256),
                             size = coalesce(?, size), content_type = coalesce(?, content_type),
                             stored_at = coalesce(?, stored_at), updated_at = ?
           WHERE id = ? AND lease_owner = ? AND state = 'downloading'""",
        (
            result.state.value,
            result.error,
            result.retry_at,
            int(result.count_attempt),
            result.location,
            result.sha256,
            result.size,
            result.content_type,
            result.stored_at,
            now,
            asset_id,
            owner,
        ),
    )
    if settled.rowcount != 1:
        return False
    if result.state is AssetState.stored:
        conn.execute(
            """UPDATE tasks SET archived_at = coalesce(archived_at, ?)
               WHERE id = (SELECT task_pk FROM assets WHERE id = ?)
                 AND NOT EXISTS (SELECT 1 FROM assets AS other
                                 WHERE other.task_pk = tasks.id AND other.state != 'stored')""",
            (now, asset_id),
        )
    return True


def _binding(row: sqlite3.Row | None) -> Binding | None:
    if row is None:
        return None
    return Binding(row["task_id"], row["external_task_id"], row["callback_ref"])


def _status(value: str | None) -> TaskStatus | None:
    return None if value is None else TaskStatus(value)


def _task_record(conn: sqlite3.Connection, row: sqlite3.Row) -> TaskRecord:
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


def _event_record(task_id: str, row: sqlite3.Row) -> EventRecord:
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


def _encode_cursor(pk: int) -> str:
    return base64.urlsafe_b64encode(f"id:{pk}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text.startswith("id:") and 0 < (pk := int(text[3:])) < 2**63:
            return pk  # beyond SQLite's INTEGER, the query itself would fail
    except (ValueError, UnicodeDecodeError):
        pass
    raise ValueError("cursor is not one this service returned")
