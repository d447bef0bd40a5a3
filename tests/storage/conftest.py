"""Fixtures for the storage tests: a real S3-compatible server (SeaweedFS) on loopback."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.s3_server import SeaweedS3


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of SeaweedFS's logs to the report of a failed test that used `s3`."""
    report = yield
    server = getattr(item, "funcargs", {}).get("s3")
    if report.failed and isinstance(server, SeaweedS3):
        report.sections.append(("seaweedfs logs", server.logs()))
    return report
