"""The account sweep in process: its durable window, adoption, and what it leaves alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from receiver.database import open_ledger
from receiver.kling import KlingClient, client_for
from receiver.ledger import Ledger
from receiver.models import Source, TaskStatus
from receiver.settings import Settings
from receiver.sweep import MARK, OVERLAP_MS, Sweeper, Tally, sweep
from tests.fake_kling import FakeKling
from tests.support import KLING_API_KEY, app_settings

pytestmark = pytest.mark.anyio

T26 = "text-to-video/kling-2.6"
HOUR_MS = 3_600_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path, kling: FakeKling) -> Settings:
    return app_settings(
        tmp_path,
        kling_api_base=kling.base_url,
        kling_api_key=KLING_API_KEY,
        kling_retry_base_seconds=0.01,
    )


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    """The ledger on each backend (SQLite, PostgreSQL): every test using it runs on both."""
    async with open_ledger(ledger_url) as opened:
        yield opened


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[KlingClient]:
    async with client_for(settings) as made:
        yield made


class Clock:
    """Milliseconds since 1970 that the test moves on."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def succeeded(kling: FakeKling, created_at: int) -> str:
    task = kling.add_task(T26, created_at=created_at)
    kling.advance(task.task_id, "succeed")
    return task.task_id


async def test_the_first_pass_only_marks_where_sweeping_begins(
    kling: FakeKling, ledger: Ledger, client: KlingClient, settings: Settings
) -> None:
    """Nothing is listed at the very first start: the mark is the start."""
    clock = Clock(1_800_000_000_000)
    sweeper = Sweeper(ledger, client, settings, _clock=clock)
    assert await sweeper.once() is None
    assert await ledger.mark(MARK) == str(clock.now)
    assert kling.listings() == []


async def test_each_sweep_starts_where_the_last_ended_less_the_overlap(
    kling: FakeKling, ledger: Ledger, client: KlingClient, settings: Settings
) -> None:
    """Windows chain with an overlap, so a task that finished late is listed again."""
    clock = Clock(1_800_000_000_000)
    sweeper = Sweeper(ledger, client, settings, _clock=clock)
    await sweeper.once()
    late = succeeded(kling, clock.now - HOUR_MS)  # created before the mark, inside the overlap
    clock.now += HOUR_MS
    tally = await sweeper.once()
    assert tally is not None and (tally.seen, tally.adopted) == (1, 1)
    clock.now += HOUR_MS
    again = await sweeper.once()
    assert again is not None and (again.seen, again.adopted, again.known) == (1, 0, 1)

    windows = [(r.body["start_time"], r.body["end_time"]) for r in kling.listings()]
    start = 1_800_000_000_000
    assert windows == [
        (start - OVERLAP_MS, start + HOUR_MS),
        (start + HOUR_MS - OVERLAP_MS, start + 2 * HOUR_MS),
    ]
    task = await ledger.task(late)
    assert task is not None and task.status is TaskStatus.succeed
    assert task.terminal_source is Source.sweep
    assert len(task.assets) == 1
    # Once, though listed twice: the second listing found it finished already.
    recoveries = {"source": "sweep"}
    registry = sweeper.metrics.registry
    assert registry.get_sample_value("kling_receiver_recoveries_total", recoveries) == 1


async def test_a_failed_sweep_leaves_its_window_to_the_next(
    kling: FakeKling, ledger: Ledger, client: KlingClient, settings: Settings
) -> None:
    """When the listing fails part way, the mark stays: the span is swept again, not skipped."""
    clock = Clock(1_800_000_000_000)
    sweeper = Sweeper(ledger, client, settings, _clock=clock)
    await sweeper.once()
    clock.now += HOUR_MS
    kling.api_key = "another-key"  # every request is refused from here
    assert await sweeper.once() is None
    assert await ledger.mark(MARK) == str(1_800_000_000_000)


async def test_paging_visits_every_task_and_adopts_the_unknown_ones(
    kling: FakeKling, ledger: Ledger, client: KlingClient, settings: Settings
) -> None:
    """Three pages of a listing; a task the ledger knows finished is only counted."""
    base = 1_800_000_000_000
    ids = [succeeded(kling, base + n) for n in range(7)]
    first = await sweep(ledger, client, settings, base, base + 10, page_limit=3)
    assert (first.seen, first.adopted, first.known, first.pages) == (7, 7, 0, 3)
    seen: list[Tally] = []
    second = await sweep(ledger, client, settings, base, base + 10, progress=seen.append)
    assert (second.seen, second.adopted, second.known) == (7, 0, 7)
    assert [t.seen for t in seen] == [7]
    for task_id in ids:
        task = await ledger.task(task_id)
        assert task is not None and task.terminal_source is Source.sweep
        assert len(await ledger.events(task_id) or []) == 1  # the second sweep added nothing


async def test_one_process_of_a_fleet_sweeps_and_another_takes_over_when_it_stops(
    ledger_url: str, kling: FakeKling, client: KlingClient, settings: Settings
) -> None:
    """Two processes on one ledger: the turn's holder sweeps, the other waits, then takes over."""
    quick = settings.model_copy(update={"sweep_interval": 0.2})
    url = ledger_url
    async with open_ledger(url) as first_ledger, open_ledger(url) as second_ledger:
        first = Sweeper(first_ledger, client, quick, owner="first")
        second = Sweeper(second_ledger, client, quick, owner="second")
        await first.turn()  # the very first sweep only marks where sweeping begins
        listed = len(kling.listings())
        assert await second.turn() is None  # held by the first
        assert await first.turn() is not None  # renewed, and swept
        assert await second.turn() is None
        assert len(kling.listings()) == listed + 1
        await asyncio.sleep(0.35)  # the first stops renewing; its turn lapses
        assert await second.turn() is not None
        assert await first.turn() is None
