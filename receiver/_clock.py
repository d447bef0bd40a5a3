"""The one place the service reads the wall clock for the times it records."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utc_now"]


def utc_now() -> str:
    """Now as ISO 8601 UTC with milliseconds, sortable as text: 2026-11-25T03:38:59.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
