"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Service


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every request of these tests on loopback, whatever proxy the environment names."""
    for name in list(os.environ):
        if name.upper().endswith("_PROXY"):
            monkeypatch.delenv(name)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start services on demand (`services(name, ready=, env=..., ...)`); all killed at the end."""
    started: list[Service] = []

    def start(name: str = "data", ready: bool = True, **options: Any) -> Service:
        service = Service(tmp_path / name, **options)
        started.append(service)
        service.start(ready)
        return service

    yield start
    for service in started:
        service.kill_all()
