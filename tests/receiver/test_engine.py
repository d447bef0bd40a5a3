"""The SQLite engine's group commit: writes that share a transaction, and one that fails."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from receiver._sqlite import engine as engine_module
from receiver._sqlite.engine import _ASIDE_FROM, _MAX_RESTARTS, Engine
from receiver.ledger import LedgerUnavailable

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _insert(name: str, fail: bool = False) -> Callable[[sqlite3.Connection], str]:
    def op(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO notes (name) VALUES (?)", (name,))
        if fail:
            raise ValueError(f"{name} fails after its insert")
        return name

    return op


async def test_a_failing_write_is_undone_alone(tmp_path: Path) -> None:
    """Writes queued together commit together; one that raises part-way leaves no trace and
    its error reaches only its own caller."""
    async with Engine(tmp_path / "ledger.db") as engine:
        await engine.write(lambda conn: conn.execute("CREATE TABLE notes (name TEXT UNIQUE)"))
        ops = [_insert(f"n{i}", fail=i == 5) for i in range(10)]
        results = await asyncio.gather(*(engine.write(op) for op in ops), return_exceptions=True)

        assert isinstance(results[5], ValueError)
        assert results[:5] + results[6:] == [f"n{i}" for i in range(10) if i != 5]
        names = await engine.read(
            lambda conn: [row[0] for row in conn.execute("SELECT name FROM notes ORDER BY name")]
        )
    assert names == sorted(f"n{i}" for i in range(10) if i != 5)


async def test_a_constraint_error_spares_the_rest_of_its_group(tmp_path: Path) -> None:
    """A write refused by the database (a UNIQUE clash) fails alone; the others commit."""
    async with Engine(tmp_path / "ledger.db") as engine:
        await engine.write(lambda conn: conn.execute("CREATE TABLE notes (name TEXT UNIQUE)"))
        names = ["a", "b", "a", "c"]
        results = await asyncio.gather(
            *(engine.write(_insert(n)) for n in names), return_exceptions=True
        )
        stored = await engine.read(
            lambda conn: sorted(row[0] for row in conn.execute("SELECT name FROM notes"))
        )
    assert [isinstance(r, sqlite3.IntegrityError) for r in results] == [False, False, True, False]
    assert stored == ["a", "b", "c"]


class _Ticker:
    """Counts the event loop's turns: one a millisecond while the loop runs."""

    def __init__(self) -> None:
        self.ticks = 0
        self._loop = asyncio.get_running_loop()
        self._tick()

    def _tick(self) -> None:
        self.ticks += 1
        self._loop.call_later(0.001, self._tick)

    def slow(self, conn: sqlite3.Connection) -> tuple[int, int]:
        """A write that takes 0.04 s (the loop would tick about 40 times): ticks before, after.

        A group of _ASIDE_FROM of them stays under _ASIDE_MOST, the longest a loop stands aside.
        """
        before = self.ticks
        time.sleep(0.04)
        return before, self.ticks


async def _busy_writer(engine: Engine, seconds: float = 0.1) -> asyncio.Future[Any]:
    """A write that keeps the writer busy for `seconds`, once the writer has begun it."""
    started = threading.Event()

    def busy(conn: sqlite3.Connection) -> None:
        started.set()
        time.sleep(seconds)

    write = asyncio.ensure_future(engine.write(busy))
    await asyncio.to_thread(started.wait, 5)
    return write


async def _group_behind_a_busy_writer(engine: Engine, ops: list[Callable[..., Any]]) -> list[Any]:
    """Run `ops` as one group: queued while the writer is busy with another write."""
    busy = await _busy_writer(engine)
    results = await asyncio.wait_for(asyncio.gather(busy, *(engine.write(op) for op in ops)), 5)
    return results[1:]


async def test_the_event_loop_stands_aside_while_its_writes_run(tmp_path: Path) -> None:
    """While the writer runs a group's statements, the loop waiting for them runs nothing
    (it would take the GIL from the writer at every statement)."""
    async with Engine(tmp_path / "ledger.db") as engine:
        ticker = _Ticker()
        results = await _group_behind_a_busy_writer(engine, [ticker.slow] * _ASIDE_FROM)
        await asyncio.sleep(0.05)
    assert all(before == after for before, after in results)
    assert ticker.ticks > results[-1][1]  # and ticked again once the statements had run


async def test_a_small_group_does_not_ask_the_loop_to_stand_aside(tmp_path: Path) -> None:
    """A lone write (a download's claim, say) is done without stopping the loop."""
    async with Engine(tmp_path / "ledger.db") as engine:
        ticker = _Ticker()
        before, after = await asyncio.wait_for(engine.write(ticker.slow), 5)
    assert after > before


async def test_a_busy_loop_does_not_hold_up_the_writer(tmp_path: Path) -> None:
    """A loop that cannot stand aside (here: blocked) is not waited for long."""
    ran_at: list[float] = []

    def op(conn: sqlite3.Connection) -> None:
        ran_at.append(time.monotonic())

    async with Engine(tmp_path / "ledger.db") as engine:
        busy = await _busy_writer(engine)
        group = [asyncio.ensure_future(engine.write(op)) for _ in range(_ASIDE_FROM)]
        await asyncio.sleep(0)  # the group is queued
        blocked_at = time.monotonic()
        time.sleep(0.5)  # noqa: ASYNC251 (the point: this loop answers nothing meanwhile)
        await asyncio.wait_for(asyncio.gather(busy, *group), 5)
    # The busy write's 0.1 s, then at most _ASIDE_WAIT (0.05 s) waiting for the loop.
    assert len(ran_at) == _ASIDE_FROM and max(ran_at) - blocked_at < 0.3


async def test_a_closed_loop_does_not_stop_the_writer(tmp_path: Path) -> None:
    """Writes whose event loop closed before they ran (a group big enough to ask the loop
    to stand aside) are done anyway, and the writer goes on serving everyone else."""
    closed = threading.Event()
    names = [f"from a closed loop {i}" for i in range(_ASIDE_FROM)]

    async with Engine(tmp_path / "ledger.db") as engine:
        await engine.write(lambda conn: conn.execute("CREATE TABLE notes (name TEXT UNIQUE)"))
        first = asyncio.ensure_future(engine.write(lambda conn: closed.wait(5)))

        async def give_up() -> None:
            writes = asyncio.gather(*(engine.write(_insert(name)) for name in names))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writes, 0.05)

        def run_and_close() -> None:
            asyncio.run(give_up())  # closes its loop on return
            closed.set()

        await asyncio.to_thread(run_and_close)
        await asyncio.wait_for(first, 5)
        assert await asyncio.wait_for(engine.write(_insert("after")), 5) == "after"
        stored = await engine.read(
            lambda conn: sorted(row[0] for row in conn.execute("SELECT name FROM notes"))
        )
    assert stored == sorted([*names, "after"])


async def test_results_are_taken_before_the_loop_stands_aside_again(tmp_path: Path) -> None:
    """A caller that awaits its write (as a delivery does) resumes before its loop stands
    aside for the next group, not after that group's statements."""
    busy_started = threading.Event()
    started: list[float] = []

    def busy(conn: sqlite3.Connection) -> None:
        busy_started.set()
        time.sleep(0.1)

    def op(conn: sqlite3.Connection) -> None:
        started.append(time.monotonic())
        time.sleep(0.02)

    async with Engine(tmp_path / "ledger.db") as engine:

        async def queue_group() -> list[None]:
            await asyncio.to_thread(busy_started.wait, 5)
            return await asyncio.gather(*(engine.write(op) for _ in range(_ASIDE_FROM)))

        group = asyncio.ensure_future(queue_group())
        await engine.write(busy)  # in this task, not wrapped in another (as wait_for would)
        resumed = time.monotonic()
        await asyncio.wait_for(group, 5)
    assert resumed < min(started)


# -- a writer that fails -----------------------------------------------------------


class _Fault:
    """Makes the writer thread itself fail (not one write) on its next `times` groups.

    With `hold`, the first failing group waits for it, so that tests can queue writes
    behind a group in flight.
    """

    def __init__(self, times: int, hold: threading.Event | None = None) -> None:
        self.times = times
        self.hold = hold
        self.entered = threading.Event()
        self._real = engine_module._run_together

    def __call__(self, conn: sqlite3.Connection, batch: list[Any]) -> Any:
        if self.times <= 0:
            return self._real(conn, batch)
        self.times -= 1
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(5)
        raise RuntimeError("injected writer fault")


async def _queued(engine: Engine, count: int) -> None:
    """Until `count` writes wait in the writer's queue."""
    deadline = time.monotonic() + 5
    while engine._queue.qsize() < count:
        assert time.monotonic() < deadline, "the writes were never queued"
        await asyncio.sleep(0.001)


async def test_a_failed_writer_fails_every_waiting_write_and_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group in flight and the writes queued behind it fail with LedgerUnavailable (none
    waits forever); a new writer then takes writes as before."""
    hold = threading.Event()
    fault = _Fault(times=1, hold=hold)
    async with Engine(tmp_path / "ledger.db") as engine:
        await engine.write(lambda conn: conn.execute("CREATE TABLE notes (name TEXT UNIQUE)"))
        monkeypatch.setattr(engine_module, "_run_together", fault)
        in_flight = asyncio.ensure_future(engine.write(_insert("a")))
        await asyncio.to_thread(fault.entered.wait, 5)
        queued = [asyncio.ensure_future(engine.write(_insert(name))) for name in "bc"]
        await _queued(engine, 2)
        hold.set()
        results = await asyncio.wait_for(
            asyncio.gather(in_flight, *queued, return_exceptions=True), 5
        )
        assert [type(result) for result in results] == [LedgerUnavailable] * 3
        assert "injected writer fault" in str(results[0])

        assert await asyncio.wait_for(engine.write(_insert("d")), 5) == "d"
        assert engine.writer_problem is None
        names = await engine.read(
            lambda conn: [row[0] for row in conn.execute("SELECT name FROM notes")]
        )
    assert names == ["d"]


async def test_a_writer_that_keeps_failing_stays_down_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After _MAX_RESTARTS failures in a row, writes fail at once and writer_problem says why."""
    async with Engine(tmp_path / "ledger.db") as engine:
        monkeypatch.setattr(engine_module, "_run_together", _Fault(times=_MAX_RESTARTS))
        for attempt in range(_MAX_RESTARTS):
            assert engine.writer_problem is None, attempt
            with pytest.raises(LedgerUnavailable, match="injected writer fault"):
                await asyncio.wait_for(engine.write(lambda conn: None), 5)
        problem = engine.writer_problem
        assert problem is not None and f"{_MAX_RESTARTS} times in a row" in problem
        with pytest.raises(LedgerUnavailable, match="times in a row"):
            await engine.write(lambda conn: None)
