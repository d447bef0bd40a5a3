"""kling-receiver: receive Kling task updates, record them durably, archive every file."""

from __future__ import annotations

from receiver.app import create_app
from receiver.database import open_ledger
from receiver.ledger import Ledger, LedgerError, LedgerUnavailable
from receiver.models import AssetKind, AssetState, KlingTask, Source, TaskStatus
from receiver.settings import ConfigError, Settings, load_settings

__all__ = [
    "AssetKind",
    "AssetState",
    "ConfigError",
    "KlingTask",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "Settings",
    "Source",
    "TaskStatus",
    "create_app",
    "load_settings",
    "open_ledger",
]
