"""The one place the service reads the wall clock for the times it records."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from datetime import datetime

__all__ = [
    "age_seconds",
    "epoch_now",
    "parse_time",
    "stamp",
    "utc_in",
    "utc_now",
    "wait_for_event",
]


def utc_now() -> str:
    """Now as ISO 8601 UTC with milliseconds, sortable as text: 2026-11-25T03:38:59.123Z."""
    return stamp(time.time())


def utc_in(seconds: float) -> str:
    """That many seconds from now, in the same sortable form as `utc_now`."""
    return stamp(time.time() + seconds)


def epoch_now() -> float:
    """Now as seconds since the epoch, for rules that take the time as a parameter."""
    return time.time()


# The times `stamp` writes as they are: from 1900 (strftime pads 4-digit years only) to 9999.
_FIRST = -2208988800.0
_LAST = 253402300799.0


def stamp(epoch: float) -> str:
    """Seconds since the epoch in the form of `utc_now`: to the microsecond, then truncated.

    A time outside 1900-9999 (or not a number) is written as the nearer end of that
    range: it still sorts first or last, where gmtime would raise or strftime misorder.
    """
    if not _FIRST <= epoch <= _LAST:
        epoch = _FIRST if epoch < _FIRST else _LAST
    fraction, whole = math.modf(epoch)  # rounded as datetime.fromtimestamp rounds
    micros = round(fraction * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:  # before 1970
        whole, micros = whole - 1, micros + 1_000_000
    return f"{_second(int(whole))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=16)
def _second(whole: int) -> str:
    # A delivery asks for the same few seconds many times over: one strftime for each.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def parse_time(text: str) -> datetime:
    """A time written by `utc_now` or `utc_in`, back as an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


_AGE_UNITS = {"d": 86400, "h": 3600, "m": 60}


def age_seconds(text: str) -> int | None:
    """Seconds in an age such as 30d, 12h or 90m; None when `text` is not one."""
    number, unit = text[:-1], text[-1:]
    if unit not in _AGE_UNITS or not (number.isascii() and number.isdigit()) or len(number) > 6:
        return None
    return int(number) * _AGE_UNITS[unit]


async def wait_for_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` have passed; True if it was set.

    Not `asyncio.wait_for`: before Python 3.12 it can swallow a cancellation that arrives
    as the event is set, and a loop waiting with it would then never stop.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
