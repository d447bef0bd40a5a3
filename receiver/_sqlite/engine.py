"""The SQLite engine: WAL, one writer thread with group commit, pooled readers.

Every write goes through one thread that takes whatever writes are waiting,
runs them in one transaction and commits them together, so a burst of
deliveries costs one fsync rather than one each. While it runs a group, the
event loops waiting for those writes stand aside (see `_loops_aside`). One
write that fails does not sink the others: the group is then run again, each
write in its own savepoint, and only the failed one is undone. Readers use
their own connections and never wait for the writer. Several processes may
share the file: SQLite's lock serialises their writers.

Should the writer thread itself fail (an error outside any one write), no write
is left waiting: the group it was running and every write queued behind it fail
with `LedgerUnavailable`, and the writer starts again on a fresh connection. One
that fails `_MAX_RESTARTS` times in a row (no group run through in between)
stays down: every write then fails at once, and `writer_problem` (which
`/readyz` reports) says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
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

log = logging.getLogger("receiver.ledger")

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]
_Write = tuple[_Op, asyncio.Future[Any]]
_Settled = tuple[asyncio.Future[Any], Any, BaseException | None]  # a write's future and outcome
# Writer failures in a row (no group run through in between) after which it stays down.
_MAX_RESTARTS = 3
_MAX_BATCH = 512
_ASIDE_FROM = 4  # writes in a group for its loops to stand aside (see _loops_aside)
_ASIDE_WAIT = 0.05  # seconds the writer waits for a loop to stand aside before writing anyway
_ASIDE_MOST = 0.25  # the longest a loop stands aside for one group


class Engine:
    """One SQLite file: a writer thread that commits in groups, and a pool of readers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        # Held to hand a write over and to change the writer, so that no write is queued
        # for a writer that is gone (see _writer_failed).
        self._handover = threading.Lock()
        self._down: LedgerUnavailable | None = None  # why writes cannot be taken now
        self._failures = 0  # writer failures since the last group it ran through
        self._closing = False
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []

    async def __aenter__(self) -> Self:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = await asyncio.to_thread(self._open_writer)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerUnavailable(f"cannot open the database at {self.path}: {exc}") from exc
        self._start_writer(conn)
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ledger-reader")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._writer is not None:
            with self._handover:
                self._closing = True  # a writer that fails from now on is not started again
                self._queue.put(None)  # drains what is queued, then stops
            # Until the writer that takes the stop has ended (a failed one hands over).
            while True:
                writer = self._writer
                await asyncio.to_thread(writer.join)
                if writer is self._writer:
                    break
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

    def _start_writer(self, conn: sqlite3.Connection) -> None:
        writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="ledger-writer", daemon=True
        )
        writer.start()
        self._writer = writer  # only once alive: `writer_problem` reads it without the lock

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        batch: list[_Write] = []
        try:
            stopping = False
            while not stopping:
                batch, stopping = self._next_batch()
                if batch:
                    self._run_batch(conn, batch)
                    batch = []
                    self._failures = 0
        except BaseException as exc:  # whatever it was, no caller may be left waiting
            self._writer_failed(conn, batch, exc)
            return
        conn.close()

    def _next_batch(self) -> tuple[list[_Write], bool]:
        """The writes waiting (after waiting for one), and whether a stop came behind them."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < _MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _writer_failed(
        self, conn: sqlite3.Connection, batch: list[_Write], exc: BaseException
    ) -> None:
        """Fail the group in hand and every queued write, then start a new writer if it may.

        Writes that come while the new writer opens wait for it; should it not open, they
        fail too.
        """
        log.critical("the ledger writer failed", exc_info=exc)
        with contextlib.suppress(Exception):  # its transaction is undone by closing, if not here
            conn.rollback()
        with contextlib.suppress(Exception):
            conn.close()
        failure = LedgerUnavailable(f"the ledger's writer failed: {exc!r}")
        with self._handover:
            self._failures += 1
            if self._failures >= _MAX_RESTARTS:
                self._down = LedgerUnavailable(
                    f"the ledger's writer failed {self._failures} times in a row and was not "
                    f"started again; the last failure: {exc!r}"
                )
            stays_down = self._down is not None or self._closing
            pending = self._drain()
        _fail([*batch, *pending], failure)
        if not stays_down:
            self._restart_writer()

    def _restart_writer(self) -> None:
        """Open a new writer connection and hand the queue to a new writer thread."""
        fresh: sqlite3.Connection | None = None
        failure = LedgerUnavailable("the ledger is closed")
        try:
            fresh = self._open_writer()
        except BaseException as exc:
            log.critical("the ledger writer could not be started again", exc_info=exc)
            failure = LedgerUnavailable(f"the ledger's writer cannot start again: {exc}")
        with self._handover:
            if fresh is not None and not self._closing:
                self._start_writer(fresh)
                log.warning("the ledger writer started again", extra={"failures": self._failures})
                return
            if fresh is None:
                self._down = failure
            else:
                fresh.close()
            pending = self._drain()
        _fail(pending, failure)

    def _drain(self) -> list[_Write]:
        """Every write still queued (a stop among them is dropped: the writer stops anyway)."""
        pending: list[_Write] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return pending
            if item is not None:
                pending.append(item)

    @property
    def writer_problem(self) -> str | None:
        """None while writes can be taken; otherwise why not (the writer is down or closed)."""
        if self._down is not None:
            return str(self._down)
        if self._closing or self._writer is None or not self._writer.is_alive():
            return "the ledger is closed"
        return None

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Write]) -> None:
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
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._handover:
            problem = self.writer_problem
            if problem is not None:
                raise LedgerUnavailable(problem)
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
    conn: sqlite3.Connection, batch: list[_Write]
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
    conn: sqlite3.Connection, batch: list[_Write]
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


def _fail(writes: list[_Write], error: LedgerUnavailable) -> None:
    """Settle every one of `writes` with `error`: one wake-up of each waiting event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Settled]] = {}
    for _, future in writes:
        by_loop.setdefault(future.get_loop(), []).append((future, None, error))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there
            loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[_Settled]) -> None:
    for future, value, error in settled:
        if future.done():  # cancelled, or settled before its writer failed
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
