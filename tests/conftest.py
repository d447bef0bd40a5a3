"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from receiver.settings import Settings
from tests.fake_kling import FakeKling, fake_kling
from tests.media_server import MediaServer, media_server
from tests.pg_server import PostgresServer
from tests.s3_server import SeaweedS3
from tests.support import KLING_API_KEY, Service, app_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for an in-process app with its data under tmp_path, download workers off."""
    return app_settings(tmp_path)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """A running service process, stopped (SIGKILL if it must) at the end of the test."""
    running = Service(tmp_path / "data")
    running.start()
    yield running
    if running.process is not None:
        running.process.kill()
        running.process.wait()


@pytest.fixture
def media() -> Iterator[MediaServer]:
    """A misbehaving-on-purpose HTTP media server on 127.0.0.1."""
    with media_server() as server:
        yield server


@pytest.fixture
def kling(media: MediaServer) -> Iterator[FakeKling]:
    """A fake Kling API on 127.0.0.1 taking KLING_API_KEY, its result files on `media`."""
    with fake_kling(media, api_key=KLING_API_KEY) as fake:
        yield fake


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One `weed mini` for the whole session, started only if a test asks for it.

    Session scope: a start costs ~0.75 s and a stop 1.2-3 s of a 2-core machine, while
    tests isolate themselves for free with unique keys (or `s3.create_bucket()`). Its logs
    stay under pytest's basetemp (`seaweedfs0/`); its data is deleted at the end. The stop
    also keeps the interpreter running for a while after the last async obstore call.
    Obstore issue 471 needs that: exiting right after one of those calls can abort the
    process (SIGABRT).
    """
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL on 127.0.0.1 for the session, started only if a test asks.

    Debian's server binaries, run as the `postgres` user when we are root; missing binaries
    fail the test with the install command (`tests/pg_server.py`). Tests isolate themselves
    with `postgres.create_database()`; one that stops the server (`postgres.stopped()`,
    `restart()`) leaves it running again. Its directory is deleted at the end.
    """
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres: PostgresServer) -> str:
    """`postgresql://postgres@127.0.0.1:PORT/kling_test` on the session's `postgres`."""
    return postgres.url


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty ledger database on each backend: the ledger contract holds on both.

    A SQLite file under tmp_path, or a new database on the session's `postgres`.
    """
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres")
        return server.create_database()
    return f"sqlite:///{tmp_path}/ledger.db"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of SeaweedFS's (or PostgreSQL's) logs to a failed test using `s3`
    (or `postgres`)."""
    report = yield
    server = getattr(item, "funcargs", {}).get("s3")
    if report.failed and isinstance(server, SeaweedS3):
        report.sections.append(("seaweedfs logs", server.logs()))
    postgres = getattr(item, "funcargs", {}).get("postgres")
    if report.failed and isinstance(postgres, PostgresServer):
        report.sections.append(("postgresql log", postgres.logs()))
    return report
