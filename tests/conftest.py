"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.settings import Settings, load_settings
from tests.fake_kling import FakeKling, fake_kling
from tests.media_server import MediaServer, media_server
from tests.support import ADMIN_TOKEN, CALLBACK_SECRET, KLING_API_KEY, Service


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for an in-process app with its data under tmp_path, download workers off."""
    return load_settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        download_concurrency=0,
        callback_secret=CALLBACK_SECRET,
        admin_token=ADMIN_TOKEN,
    )


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
