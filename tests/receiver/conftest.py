"""Fixtures of the receiver's async tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from receiver.database import open_ledger
from receiver.ledger import Ledger


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    """A fresh ledger on each backend (a module may define its own)."""
    async with open_ledger(ledger_url) as opened:
        yield opened
