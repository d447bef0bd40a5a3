"""Reading a service's ledger from outside it, on either backend, to check what it recorded.

The benchmarks' queries are plain SQL that SQLite and PostgreSQL read alike (the two
schemas keep the same tables, columns and ISO-8601 text times).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import psycopg

from receiver.database import POSTGRES_SCHEMES, sqlite_path

__all__ = ["Reader", "is_postgres", "reading", "sqlite_url"]


class Reader(Protocol):
    def __call__(self, query: str) -> list[tuple[Any, ...]]: ...


def is_postgres(database_url: str) -> bool:
    return database_url.split(":", 1)[0] in POSTGRES_SCHEMES


def sqlite_url(path: object) -> str:
    """The DATABASE_URL of a SQLite file at an absolute `path`."""
    return f"sqlite:///{path}"


@contextmanager
def reading(database_url: str) -> Iterator[Reader]:
    """A function running one read-only query on the ledger at `database_url`: its rows."""
    if is_postgres(database_url):
        with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
            yield lambda query: conn.execute(query).fetchall()
        return
    # Read-only, and patient: the service may be committing while we look.
    conn = sqlite3.connect(f"file:{sqlite_path(database_url)}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout = 30000")
        yield lambda query: conn.execute(query).fetchall()
    finally:
        conn.close()
