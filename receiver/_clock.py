"""The one place the service reads the wall clock for the times it records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["parse_time", "utc_in", "utc_now"]


def utc_now() -> str:
    """Now as ISO 8601 UTC with milliseconds, sortable as text: 2026-11-25T03:38:59.123Z."""
    return utc_in(0)


def utc_in(seconds: float) -> str:
    """That many seconds from now, in the same sortable form as `utc_now`."""
    when = datetime.now(UTC) + timedelta(seconds=seconds)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """A time written by `utc_now` or `utc_in`, back as an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
