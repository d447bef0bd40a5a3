"""`open_ledger(DATABASE_URL)`: the ledger a URL names, in the backend its scheme chooses.

The interface (`receiver.ledger`) knows no backend; each backend imports the
interface, and only this module imports the backends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from receiver._sqlite import SQLiteLedger
from receiver.ledger import Ledger, LedgerUnavailable

__all__ = ["POSTGRES_SCHEMES", "open_ledger", "sqlite_path"]

# The schemes of a DATABASE_URL that names a PostgreSQL database (libpq's own two).
POSTGRES_SCHEMES = ("postgresql", "postgres")


@asynccontextmanager
async def open_ledger(database_url: str) -> AsyncIterator[Ledger]:
    """Open the ledger named by DATABASE_URL, creating or migrating its schema.

    `postgresql://…` (or `postgres://…`) opens the shared PostgreSQL backend; anything
    else must be a `sqlite:///file` URL.
    """
    if urlsplit(database_url).scheme in POSTGRES_SCHEMES:
        # Imported here: a SQLite deployment never loads the PostgreSQL driver.
        from receiver._postgres import PostgresLedger

        async with PostgresLedger(database_url) as postgres:
            yield postgres
        return
    async with SQLiteLedger(sqlite_path(database_url)) as ledger:
        yield ledger


def sqlite_path(database_url: str) -> Path:
    """The file of a `sqlite:///relative` or `sqlite:////absolute` URL."""
    parts = urlsplit(database_url)
    if parts.scheme != "sqlite" or parts.netloc or not parts.path:
        raise LedgerUnavailable(
            "DATABASE_URL must look like sqlite:///data/kling-receiver.db or"
            f" postgresql://user@host/db, got {parts.scheme}:…"
        )
    return Path(unquote(parts.path[1:]))
