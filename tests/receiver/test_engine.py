"""The SQLite engine's group commit: writes that share a transaction, and one that fails."""

from __future__ import annotations

import asyncio
import sqlite3
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
