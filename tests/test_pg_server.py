"""The tests' own PostgreSQL (tests/pg_server.py): real, on loopback, durable across restarts."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from tests.pg_server import PostgresError, PostgresServer, find_bindir


def test_a_committed_row_survives_a_crash_and_a_restart(
    postgres: PostgresServer, postgres_url: str
) -> None:
    """A row committed before an immediate stop (no checkpoint) is there after WAL replay."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()
            for name in ("listen_addresses", "fsync", "synchronous_commit")
        }
        assert settings == {
            "listen_addresses": ("127.0.0.1",),
            "fsync": ("on",),
            "synchronous_commit": ("on",),
        }
        conn.execute("CREATE TABLE survivors (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO survivors VALUES (1, 'kept')")
        assert conn.execute("SELECT name FROM survivors").fetchall() == [("kept",)]

    with postgres.stopped(mode="immediate"), pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres_url, connect_timeout=2)

    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT id, name FROM survivors").fetchall() == [(1, "kept")]
        conn.execute("DROP TABLE survivors")


def test_a_pool_hands_out_working_connections_after_a_restart(postgres: PostgresServer) -> None:
    """The restart helper keeps the port, so a pool that checks its connections carries on."""
    url = postgres.create_database()
    with ConnectionPool(url, min_size=2, check=ConnectionPool.check_connection, open=True) as pool:
        with pool.connection() as conn:
            conn.execute("CREATE TABLE t (n int)")
            conn.execute("INSERT INTO t VALUES (1)")
        postgres.restart(mode="fast")
        with pool.connection() as conn:
            conn.execute("INSERT INTO t VALUES (2)")
            assert conn.execute("SELECT n FROM t ORDER BY n").fetchall() == [(1,), (2,)]


def test_missing_server_binaries_name_the_install_command(tmp_path: Path) -> None:
    """Without Debian's server the fixture fails (never skips) and says what to install."""
    with pytest.raises(
        PostgresError, match="apt-get install -y --no-install-recommends postgresql"
    ):
        find_bindir(tmp_path)


def test_the_newest_installed_major_is_used(tmp_path: Path) -> None:
    for major in ("9.6", "15", "16"):
        bindir = tmp_path / major / "bin"
        bindir.mkdir(parents=True)
        for name in ("initdb", "pg_ctl", "postgres"):
            (bindir / name).touch(mode=0o755)
    assert find_bindir(tmp_path) == tmp_path / "16" / "bin"
