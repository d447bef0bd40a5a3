"""Recorded times: ISO 8601 UTC with milliseconds, the same as datetime would write them."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from receiver._clock import parse_time, stamp, utc_in, utc_now, wait_for_event


# From 1900 (gmtime and strftime pad years from 1000 on only) to the end of year 9999.
@given(st.floats(min_value=-2208988800.0, max_value=253402300799.0))
@example(2509796723.9569993)  # float rounding just below a millisecond boundary
@example(1764059939.9999996)  # rounds up into the next second
@example(-1.5)  # before 1970: the fraction counts up from the second before
def test_stamp_writes_what_datetime_writes(epoch: float) -> None:
    expected = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    assert stamp(epoch) == expected.replace("+00:00", "Z")


def test_now_and_later_read_back_and_sort_as_text() -> None:
    before = time.time()
    now, later, earlier = utc_now(), utc_in(90), utc_in(-90)
    assert earlier < now < later
    assert abs(parse_time(now).timestamp() - before) < 5
    assert round((parse_time(later) - parse_time(now)).total_seconds()) == 90


def test_far_off_times_are_written_at_the_ends_of_the_range() -> None:
    """Ages ahead (or not a number) are written as the end of year 9999, never an overflow:
    they still sort after every real time."""
    last = "9999-12-31T23:59:59.000Z"
    assert utc_in(1e20) == utc_in(float("inf")) == stamp(float("nan")) == last
    assert stamp(1e300) == last and utc_now() < last
    assert utc_in(-1e20) == stamp(float("-inf")) == "1900-01-01T00:00:00.000Z"


def test_a_wait_for_an_event_is_cancelled_even_as_the_event_is_set() -> None:
    """A cancellation that arrives as the event is set still cancels the waiter (which
    asyncio.wait_for before Python 3.12 can swallow, leaving a loop that never stops)."""

    async def main() -> None:
        event = asyncio.Event()
        waiter = asyncio.create_task(wait_for_event(event, 10))
        await asyncio.sleep(0)  # the waiter is now waiting
        event.set()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await wait_for_event(event, 10) is True
        assert await wait_for_event(asyncio.Event(), 0.01) is False

    asyncio.run(main())
