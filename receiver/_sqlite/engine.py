"""The SQLite engine: WAL, one writer thread with group commit, pooled readers.

Every write goes through one thread that takes whatever writes are waiting,
runs them in one transaction and commits them together, so a burst of
deliveries costs one fsync rather than one each. While it runs a group, the
event loops waiting for those writes stand aside (see `_loops_aside`). One
write that fails does not sink the others: the group is then run again, each
write in its own savepoint, and only the failed one is undone. Readers use
their own connections and never wait for the writer. Several processes may
share the file: SQLite's lock serialises their writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

from receiver._sqlite.schema import connect, migrate
from receiver.ledger import LedgerUnavailable

__all__ = ["Engine"]

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]
_Settled = tuple[asyncio.Future[Any], Any, BaseException | None]  # a write's future and outcome
_MAX_BATCH = 512
_ASIDE_FROM = 4  # writes in a group for its loops to stand aside (see _loops_aside)
_ASIDE_WAIT = 0.05  # seconds the writer waits for a loop to stand aside before writing anyway
_ASIDE_MOST = 0.25  # the longest a loop stands aside for one group


class Engine:
    """One SQLite file: a writer thread that commits in groups, and a pool of readers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[tuple[_Op, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []

    async def __aenter__(self) -> Self:
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
        conn = connect(self.path)
        try:
            migrate(conn)
        except BaseException:
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
        results: list[tuple[Any, BaseException | None]] | None
        loops = {future.get_loop() for _, future in batch} if len(batch) >= _ASIDE_FROM else ()
        try:
            conn.execute("BEGIN IMMEDIATE")  # may wait for another process: loops carry on
            with _loops_aside(loops):
                results = _run_together(conn, batch)
            if results is None:
                # One write failed part-way: undo the group and run it again, each write in
                # a savepoint of its own, so that only the failed one is undone. (Savepoints
                # for every write cost about a tenth of the writer's time, for a rare case.)
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                with _loops_aside(loops):
                    results = _run_apart(conn, batch)
            conn.execute("COMMIT")  # the fsync: loops carry on
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = LedgerUnavailable(f"the database refused a write: {exc}")
            results = [(None, failure)] * len(batch)
        # One wake-up of each waiting event loop for the whole group, not one per write.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Settled]] = {}
        for (_, future), (value, error) in zip(batch, results, strict=True):
            by_loop.setdefault(future.get_loop(), []).append((future, value, error))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there
                loop.call_soon_threadsafe(_settle, settled)

    async def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` in the writer's transaction; its result once committed.

        `op` may be called more than once (when another write of its group fails, the
        group runs again), so it must do nothing but read and write through `conn`.
        """
        if self._writer is None or not self._writer.is_alive():
            raise LedgerUnavailable("the ledger is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((op, future))
        return await future

    # -- reading -------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            self._reader_conns.append(conn)
        return conn

    async def read(self, op: Callable[[sqlite3.Connection], T]) -> T:
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


@contextmanager
def _loops_aside(loops: Iterable[asyncio.AbstractEventLoop]) -> Iterator[None]:
    """While the writer runs a group's statements, the event loops keep off the GIL.

    sqlite3 releases the GIL for every statement it steps. An event loop busy with
    requests takes it at once, and the writer then waits to get it back, statement
    after statement: a group of deliveries took many times the CPU it needs, and
    the writer, not the loop, limited how many deliveries a second were recorded
    (`python -m bench ingest`). So each loop is asked to block on an Event, holding
    nothing, until the statements have run: a millisecond or two for a usual group.
    A loop that has not stood aside within `_ASIDE_WAIT` (a long callback, or a
    closed loop) is not waited for, and none stands aside longer than `_ASIDE_MOST`.
    The loops carry on during BEGIN IMMEDIATE and COMMIT, which wait on locks and disks.
    Only event loops stand aside: download and reader threads take turns as before.
    Groups of fewer than `_ASIDE_FROM` writes run without: asking costs about what it
    saves there (a burst of downloads, whose claims and records come one or two to a
    group, took 8% longer with every group asking: `python -m bench burst`).
    """
    done = threading.Event()
    asides: list[threading.Event] = []
    for loop in loops:
        aside = threading.Event()

        def stand_aside(aside: threading.Event = aside) -> None:
            aside.set()
            done.wait(_ASIDE_MOST)

        try:
            # Two hops: the loop first runs what it already has, the tasks that the
            # previous group's results woke among it, so that they do not wait for this group.
            loop.call_soon_threadsafe(functools.partial(loop.call_soon, stand_aside))
        except RuntimeError:  # the loop is closed: nobody waits there
            continue
        asides.append(aside)
    deadline = time.monotonic() + _ASIDE_WAIT
    for aside in asides:
        aside.wait(max(0.0, deadline - time.monotonic()))
    try:
        yield
    finally:
        done.set()


def _run_together(
    conn: sqlite3.Connection, batch: list[tuple[_Op, asyncio.Future[Any]]]
) -> list[tuple[Any, BaseException | None]] | None:
    """Each write's result, or None as soon as one raises (its part done is still there)."""
    results: list[tuple[Any, BaseException | None]] = []
    for op, _ in batch:
        try:
            results.append((op(conn), None))
        except Exception:
            return None
    return results


def _run_apart(
    conn: sqlite3.Connection, batch: list[tuple[_Op, asyncio.Future[Any]]]
) -> list[tuple[Any, BaseException | None]]:
    """Each write in its own savepoint: one that raises is undone alone."""
    results: list[tuple[Any, BaseException | None]] = []
    for op, _ in batch:
        conn.execute("SAVEPOINT op")
        try:
            results.append((op(conn), None))
            conn.execute("RELEASE op")
        except Exception as exc:  # one bad write must not sink the batch
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            results.append((None, exc))
    return results


def _settle(settled: list[_Settled]) -> None:
    for future, value, error in settled:
        if future.cancelled():
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
