"""The SQLite engine's group commit: writes that share a transaction, and one that fails."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from receiver._sqlite.engine import Engine

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


async def test_the_event_loop_stands_aside_while_its_writes_run(tmp_path: Path) -> None:
    """While the writer runs a group's statements, the loop waiting for them runs nothing
    (it would take the GIL from the writer at every statement)."""
    ticks = 0
    loop = asyncio.get_running_loop()

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        loop.call_later(0.001, tick)

    def slow(conn: sqlite3.Connection) -> tuple[int, int]:
        before = ticks
        time.sleep(0.1)  # the loop would tick about 100 times if it ran
        return before, ticks

    async with Engine(tmp_path / "ledger.db") as engine:
        tick()
        before, after = await asyncio.wait_for(engine.write(slow), 5)
        await asyncio.sleep(0.05)
    assert after == before
    assert ticks > after  # the loop ticked again once the statements had run


async def test_a_busy_loop_does_not_hold_up_the_writer(tmp_path: Path) -> None:
    """A loop that cannot stand aside (here: blocked) is not waited for long."""
    ran_at: list[float] = []

    def op(conn: sqlite3.Connection) -> None:
        ran_at.append(time.monotonic())

    async with Engine(tmp_path / "ledger.db") as engine:
        write = asyncio.ensure_future(engine.write(op))
        await asyncio.sleep(0)  # the write is queued
        blocked_at = time.monotonic()
        time.sleep(0.5)  # noqa: ASYNC251 (the point: this loop answers nothing meanwhile)
        await asyncio.wait_for(write, 5)
    assert ran_at and ran_at[0] - blocked_at < 0.3


async def test_a_closed_loop_does_not_stop_the_writer(tmp_path: Path) -> None:
    """A write whose event loop closed before it ran (or before it committed) is done
    anyway, and the writer goes on serving everyone else."""

    def slow(conn: sqlite3.Connection) -> None:
        time.sleep(0.3)

    async with Engine(tmp_path / "ledger.db") as engine:
        await engine.write(lambda conn: conn.execute("CREATE TABLE notes (name TEXT UNIQUE)"))
        first = asyncio.ensure_future(engine.write(slow))
        await asyncio.sleep(0.05)  # the writer is busy with `slow`

        async def give_up() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(engine.write(_insert("from a closed loop")), 0.05)

        await asyncio.to_thread(asyncio.run, give_up())  # its loop is closed on return
        await asyncio.wait_for(first, 5)
        assert await asyncio.wait_for(engine.write(_insert("after")), 5) == "after"
        names = await engine.read(
            lambda conn: sorted(row[0] for row in conn.execute("SELECT name FROM notes"))
        )
    assert names == ["after", "from a closed loop"]
