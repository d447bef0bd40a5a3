"""The ledger's reads for the dashboard, on SQLite and PostgreSQL: filtered and searched task
pages, unstored assets across tasks, and the overview's counts."""

from __future__ import annotations

import asyncio

import pytest

from receiver._clock import utc_in, utc_now
from receiver.ledger import AssetResult, Ledger
from receiver.models import AssetState, Source, TaskStatus
from tests.receiver.test_ledger import (
    T2V,
    anyio_backend,
    body,
    channel,
    db_url,
    ledger,
    succeed,
    update,
)

__all__ = ["anyio_backend", "db_url", "ledger"]  # fixtures, shared with the ledger's tests

pytestmark = pytest.mark.anyio


async def ids(ledger: Ledger, **filters: object) -> list[str]:
    page = await ledger.tasks(**filters)  # type: ignore[arg-type]
    return [task.task_id for task in page.tasks]


async def test_tasks_filter_by_action_flag_date_and_search(ledger: Ledger) -> None:
    """Each filter narrows the newest-first list; search finds a task by either id."""
    await ledger.apply(update(body("a1", "submitted", 1), channel("1"), action=T2V))
    await ledger.apply(update(body("b1", "processing", 1), channel("2"), action="images/gen"))
    # Times have millisecond resolution: a2 is recorded in a later millisecond than b1.
    b1 = await ledger.task("b1")
    assert b1 is not None
    await asyncio.sleep(0.002)
    await ledger.apply(
        update(
            body("a2", "processing", 1, task_info={"external_task_id": "ext-a2"}),
            channel("3"),
            action=T2V,
        )
    )
    a2 = await ledger.task("a2")
    assert a2 is not None
    middle = a2.created_at
    assert middle > b1.created_at
    assert await ids(ledger, action=T2V) == ["a2", "a1"]
    assert await ids(ledger, action="images/gen") == ["b1"]
    assert await ids(ledger, action="nothing/here") == []
    assert await ids(ledger, since=middle) == ["a2"]
    assert await ids(ledger, until=middle) == ["b1", "a1"]
    assert await ids(ledger, since=utc_in(3600)) == []
    assert await ids(ledger, search="a1") == ["a1"]
    assert await ids(ledger, search="ext-a2") == ["a2"]
    assert await ids(ledger, search="a") == []  # exact ids only
    assert await ids(ledger, flagged=True) == []
    assert await ids(ledger, flagged=False) == ["a2", "b1", "a1"]
    assert await ids(ledger, action=T2V, status=TaskStatus.processing) == ["a2"]
    first = await ledger.tasks(action=T2V, limit=1)
    second = await ledger.tasks(action=T2V, limit=1, cursor=first.next_cursor)
    assert [t.task_id for t in second.tasks] == ["a1"] and second.next_cursor is None


async def test_asset_problems_lists_failed_and_waiting_files_newest_first(
    ledger: Ledger,
) -> None:
    """Failed, pending and downloading assets of every task, with their task and error;
    stored ones are left out; a state filter and paging narrow it."""
    await ledger.apply(update(succeed("old", videos=2)))
    await ledger.apply(update(succeed("new", images=1)))
    jobs = {}
    for _ in range(3):
        job = await ledger.claim_asset("w", 30)
        assert job is not None
        jobs[(job.task_id, job.index)] = job
    stored = AssetResult(AssetState.stored, location="x", sha256="ab", size=1, stored_at=utc_now())
    assert await ledger.settle_asset(jobs[("old", 0)].asset_id, "w", stored)
    gone = AssetResult(AssetState.failed, error="404 <b>gone</b>")
    assert await ledger.settle_asset(jobs[("new", 0)].asset_id, "w", gone)

    page = await ledger.asset_problems()
    assert [(p.task_id, p.asset.index, p.asset.state) for p in page.problems] == [
        ("new", 0, AssetState.failed),
        ("old", 1, AssetState.downloading),
    ]
    assert page.problems[0].asset.error == "404 <b>gone</b>"
    assert page.next_cursor is None
    failed = await ledger.asset_problems(state=AssetState.failed)
    assert [p.task_id for p in failed.problems] == ["new"]
    first = await ledger.asset_problems(limit=1)
    rest = await ledger.asset_problems(limit=1, cursor=first.next_cursor)
    assert [p.task_id for p in rest.problems] == ["old"] and rest.next_cursor is None


async def test_activity_counts_statuses_sources_deliveries_and_endpoints(ledger: Ledger) -> None:
    since = utc_in(-3600)
    await ledger.set_endpoints(["https://hooks.example/a"])
    await ledger.apply(update(body("s", "submitted", 1), channel("s")))
    await ledger.apply(update(body("p", "processing", 1), channel("p")))
    await ledger.apply(update(body("p", "succeed", 2, task_result={}), source=Source.poll))
    await ledger.apply(update(body("f", "failed", 1), channel("f")))
    found = await ledger.activity(since)
    assert found.oldest_unfinished == "s"
    assert found.by_status == {"submitted": 1, "succeed": 1, "failed": 1}
    assert found.learned_from == {"poll": 1, "callback": 1}
    assert sum(count for _, count in found.per_minute) == 4
    assert all(len(minute) == 16 for minute, _ in found.per_minute)
    assert [(e.url, e.active, e.failed) for e in found.endpoints] == [
        ("https://hooks.example/a", True, 0)
    ]
    assert found.endpoints[0].pending >= 3  # events of the changes above wait to be sent
    assert (await ledger.activity(utc_in(3600))).per_minute == []
    await ledger.apply(update(body("s", "failed", 2), channel("s")))
    assert (await ledger.activity(since)).oldest_unfinished is None
