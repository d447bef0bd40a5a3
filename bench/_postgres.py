"""PostgreSQL for the benchmarks: the tests' throwaway server (`tests.pg_server`), on loopback.

One server per benchmark run, its cluster on the scratch directory's disk, fsync and
synchronous commit on (as durable as SQLite with synchronous=FULL); each subject run gets
a database of its own, dropped afterwards. `require()` fails a run before anything is
measured when Debian's server binaries are missing, naming the fix.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from bench._core import BenchError
from tests.pg_server import PostgresError, PostgresServer, find_bindir

__all__ = ["Postgres", "require", "serving"]

_TICK = os.sysconf("SC_CLK_TCK")


def require(leave_out: str) -> Path:
    """The server's bin directory, or a BenchError saying how to install it, or how to leave
    PostgreSQL out (`leave_out`, e.g. "pass --no-ingest-postgres")."""
    try:
        return find_bindir()
    except PostgresError:
        raise BenchError(
            "PostgreSQL's server binaries are missing (no /usr/lib/postgresql/*/bin/initdb): "
            "install them with `apt-get install -y --no-install-recommends postgresql` "
            f"(scripts/test does), or leave PostgreSQL out: {leave_out}"
        ) from None


@dataclass(frozen=True, slots=True)
class Postgres:
    """A running server: fresh databases on demand, and what it has cost in CPU."""

    server: PostgresServer
    version: str

    def create_database(self) -> str:
        """A new empty database; its URL."""
        return self.server.create_database()

    def drop_database(self, url: str) -> None:
        """Drop the database `url` names, closing any session still in it (PostgreSQL 13+)."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.server.url_for("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))

    def cpu_seconds(self) -> float:
        """User + system seconds of the postmaster and every backend, those already reaped
        included (so a difference over a run counts backends that ended in it)."""
        postmaster = int((self.server.data_dir / "postmaster.pid").read_text().split()[0])
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it ended while we looked
            pid, parent = int(entry.name), int(fields[1])
            if pid == postmaster:
                total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
            elif parent == postmaster:
                total += int(fields[11]) + int(fields[12])
        return total / _TICK


@contextmanager
def serving(directory: Path, bindir: Path) -> Iterator[Postgres]:
    """A PostgreSQL on 127.0.0.1 with its cluster under `directory`, until the block ends."""
    # As root the server runs as the `postgres` user, which must be able to reach its cluster.
    parent = Path(tempfile.mkdtemp(prefix="kling-bench-pg-", dir=directory))
    parent.chmod(0o711)
    server = PostgresServer(database="kling_bench", parent=parent)
    try:
        try:
            server.setup()
        except PostgresError as exc:
            hint = ""
            if os.geteuid() == 0:
                hint = "\n(as root the server runs as `postgres`, which must be able to reach "
                hint += f"{parent}: every directory above it must let others through)"
            raise BenchError(f"PostgreSQL did not start: {exc}{hint}") from exc
        yield Postgres(server, _version(bindir))
    finally:
        server.teardown()
        shutil.rmtree(parent, ignore_errors=True)


def _version(bindir: Path) -> str:
    done = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    found = re.search(r"\(PostgreSQL\) (\S+)", done.stdout)
    return f"PostgreSQL {found[1]}" if found else "PostgreSQL"
