"""The outbox's contract on real SQLite and real PostgreSQL: events written with the changes
that cause them, one delivery per endpoint, leases, per-task order, retries, 410, replay and
expiry warnings. Every test runs on both backends."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from receiver._clock import utc_in, utc_now
from receiver.ledger import AssetResult, DeliveryAttempt, Ledger
from receiver.models import AssetState
from tests.receiver.test_ledger import T2V_ID, T2V_REF, body, succeed, update
from tests.support import fixture_bytes

pytestmark = pytest.mark.anyio

A, B = "https://a.example/hook", "https://b.example/hook"


async def lifecycle(ledger: Ledger) -> None:
    for name in ("submitted", "processing", "succeed"):
        await ledger.apply(update(fixture_bytes(f"callback_text2video_{name}.json"), T2V_REF))


def doc(body: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(body)
    return parsed


async def store_all(ledger: Ledger, owner: str = "w") -> None:
    while (job := await ledger.claim_asset(owner, 30)) is not None:
        result = AssetResult(
            AssetState.stored, location=f"x/{job.asset_id}", sha256="0" * 64, size=1
        )
        assert await ledger.settle_asset(job.asset_id, owner, result)


async def send_all(ledger: Ledger) -> list[str]:
    """Claim and deliver whatever is due, as a dispatcher would, until nothing is: the
    webhook-ids in the order they were sent."""
    sent = []
    while batch := await ledger.claim_deliveries("d", 60, 10):
        for job in batch:
            sent.append(job.event.msg_id)
            await ledger.settle_delivery(job.id, "d", delivered())
    return sent


def delivered(at: str | None = None) -> DeliveryAttempt:
    return DeliveryAttempt("delivered", at or utc_now(), 1.0, 200)


async def test_changes_write_their_events_in_order_with_the_task_as_the_api_shows_it(
    ledger: Ledger,
) -> None:
    await lifecycle(ledger)
    await store_all(ledger)
    events = await ledger.outbound_events(after=0)
    assert [e.type for e in events] == [
        "task.updated",
        "task.updated",
        "task.updated",
        "asset.stored",
        "task.archived",
    ]
    statuses = [doc(e.body)["data"]["status"] for e in events[:3]]
    assert statuses == ["submitted", "processing", "succeed"]
    assert len({e.msg_id for e in events}) == 5
    assert all(e.msg_id.startswith("msg_") and e.task_id == T2V_ID for e in events)
    stored = doc(events[3].body)
    assert stored["type"] == "asset.stored" and stored["timestamp"] == events[3].created_at
    assert stored["data"]["task_id"] == T2V_ID and stored["data"]["state"] == "stored"
    archived = doc(events[4].body)["data"]
    assert archived["archived"] is True and archived["assets"][0]["state"] == "stored"
    # The succeed event shows the files it queued, as the API showed them then.
    assert doc(events[2].body)["data"]["assets"][0]["state"] == "pending"


async def test_duplicates_and_stale_deliveries_write_no_event(ledger: Ledger) -> None:
    await lifecycle(ledger)
    for name in ("succeed", "processing", "submitted"):
        await ledger.apply(update(fixture_bytes(f"callback_text2video_{name}.json"), T2V_REF))
    assert len(await ledger.outbound_events(after=0)) == 3


async def test_a_failed_task_and_a_failed_file(ledger: Ledger) -> None:
    await ledger.apply(update(body("T1", "failed", task_status_msg="content policy")))
    await ledger.apply(update(succeed("T2", images=1)))
    job = await ledger.claim_asset("w", 30)
    assert job is not None
    await ledger.settle_asset(job.asset_id, "w", AssetResult(AssetState.failed, error="gone"))
    events = await ledger.outbound_events(after=0)
    assert [e.type for e in events] == [
        "task.updated",
        "task.failed",
        "task.updated",
        "asset.failed",
    ]
    assert doc(events[1].body)["data"]["status_msg"] == "content policy"
    assert doc(events[3].body)["data"]["error"] == "gone"


async def test_each_endpoint_gets_each_event_once(ledger: Ledger) -> None:
    await ledger.set_endpoints([A, B])
    await lifecycle(ledger)
    claimed = await ledger.claim_deliveries("d", 60, 10)
    # Only the first event of the task is due at each endpoint: the rest wait their turn.
    assert sorted((c.endpoint, doc(c.event.body)["data"]["status"]) for c in claimed) == [
        (A, "submitted"),
        (B, "submitted"),
    ]
    assert await ledger.claim_deliveries("other", 60, 10) == []  # leased
    for c in claimed:
        assert await ledger.settle_delivery(c.id, "d", delivered())
    seen = []
    while batch := await ledger.claim_deliveries("d", 60, 10):
        for c in batch:
            seen.append((c.endpoint, doc(c.event.body)["data"]["status"]))
            await ledger.settle_delivery(c.id, "d", delivered())
    assert seen == [
        (A, "processing"),
        (B, "processing"),
        (A, "succeed"),
        (B, "succeed"),
    ]
    backlog = await ledger.backlog()
    assert (backlog.undelivered_events, backlog.oldest_undelivered_at) == (0, None)


async def test_events_written_before_an_endpoint_is_named_are_not_sent_to_it(
    ledger: Ledger,
) -> None:
    await ledger.apply(update(fixture_bytes("callback_text2video_submitted.json"), T2V_REF))
    await ledger.set_endpoints([A])
    assert await ledger.claim_deliveries("d", 60, 10) == []
    await ledger.apply(update(fixture_bytes("callback_text2video_processing.json"), T2V_REF))
    assert len(await ledger.claim_deliveries("d", 60, 10)) == 1


async def test_a_retried_delivery_holds_back_its_task_and_only_its_task(ledger: Ledger) -> None:
    await ledger.set_endpoints([A])
    await lifecycle(ledger)
    await ledger.apply(update(succeed("OTHER", images=1)))
    first = await ledger.claim_deliveries("d", 60, 10)
    assert sorted(c.event.task_id or "" for c in first) == sorted(["OTHER", T2V_ID])
    mine = next(c for c in first if c.event.task_id == T2V_ID)
    theirs = next(c for c in first if c.event.task_id == "OTHER")
    retry = DeliveryAttempt("pending", utc_now(), 3.0, 500, "HTTP 500", "oops", utc_in(3600))
    assert await ledger.settle_delivery(mine.id, "d", retry)
    assert await ledger.settle_delivery(theirs.id, "d", delivered())
    # The other task goes on; this one's later events wait behind the retried one.
    assert await ledger.claim_deliveries("d", 60, 10) == []
    backlog = await ledger.backlog()
    assert backlog.undelivered_events == 3
    log = await ledger.delivery_log(mine.event.msg_id)
    assert log is not None
    [entry] = log.deliveries
    assert (entry["state"], entry["attempts"], entry["last_status"]) == ("pending", 1, 500)
    assert entry["log"][0]["response"] == "oops" and entry["log"][0]["error"] == "HTTP 500"


async def test_a_settle_without_the_lease_is_refused(ledger: Ledger) -> None:
    await ledger.set_endpoints([A])
    await lifecycle(ledger)
    [job] = await ledger.claim_deliveries("d", 60, 10)
    assert not await ledger.settle_delivery(job.id, "someone-else", delivered())
    assert await ledger.settle_delivery(job.id, "d", delivered())
    assert not await ledger.settle_delivery(job.id, "d", delivered())  # no longer leased


async def test_a_lapsed_lease_is_taken_over(ledger: Ledger) -> None:
    await ledger.set_endpoints([A])
    await lifecycle(ledger)
    [job] = await ledger.claim_deliveries("d", 0.001, 10)
    await asyncio.sleep(0.01)
    [again] = await ledger.claim_deliveries("e", 60, 10)
    assert again.id == job.id and again.event.msg_id == job.event.msg_id
    assert not await ledger.settle_delivery(job.id, "d", delivered())


async def test_gone_stops_an_endpoint_until_a_replay_takes_it_back(ledger: Ledger) -> None:
    await ledger.set_endpoints([A, B])
    await lifecycle(ledger)
    jobs = await ledger.claim_deliveries("d", 60, 10)
    at_a = next(j for j in jobs if j.endpoint == A)
    at_b = next(j for j in jobs if j.endpoint == B)
    gone = DeliveryAttempt("gone", utc_now(), 1.0, 410, "the endpoint is gone (410)")
    assert await ledger.settle_delivery(at_a.id, "d", gone)
    assert await ledger.settle_delivery(at_b.id, "d", delivered())
    while later := await ledger.claim_deliveries("d", 60, 10):
        assert {j.endpoint for j in later} == {B}
        for j in later:
            await ledger.settle_delivery(j.id, "d", delivered())
    # A replay to A takes it back: what waited is sent, then the replayed events.
    assert await ledger.replay("1970-01-01T00:00:00.000Z", [], A) == 3
    again = await ledger.claim_deliveries("d", 60, 10)
    assert [(j.endpoint, j.event.msg_id) for j in again] == [(A, at_a.event.msg_id)]


async def test_replay_sends_the_same_events_again_under_the_same_ids(ledger: Ledger) -> None:
    await ledger.set_endpoints([A])
    await lifecycle(ledger)
    await store_all(ledger)
    first = await send_all(ledger)
    assert len(first) == 5
    assert (
        await ledger.replay("1970-01-01T00:00:00.000Z", ["asset.stored", "task.archived"], A) == 2
    )
    assert await ledger.replay("9999-01-01T00:00:00.000Z", [], None) == 0
    again = await send_all(ledger)
    assert again == first[3:]


async def test_a_replay_makes_an_event_waiting_for_a_retry_due_now(ledger: Ledger) -> None:
    await ledger.set_endpoints([A])
    await lifecycle(ledger)
    [job] = await ledger.claim_deliveries("d", 60, 10)
    later = DeliveryAttempt("pending", utc_now(), 3.0, 500, "HTTP 500", None, utc_in(36000))
    assert await ledger.settle_delivery(job.id, "d", later)
    assert await ledger.claim_deliveries("d", 60, 10) == []
    assert await ledger.replay("1970-01-01T00:00:00.000Z", [], None) == 3
    # Not ten hours from now: each event goes at once, and its replayed copy after it.
    sent = await send_all(ledger)
    events = [e.msg_id for e in await ledger.outbound_events(after=0)]
    assert sent == [msg_id for msg_id in events for _ in (1, 2)]
    assert sent[0] == job.event.msg_id


async def test_a_long_replay_goes_a_span_at_a_time_in_order(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans of two outbox ids: every event replayed once, in order, progress told of each
    span; the replayed copies go one after the other, as the events first did."""
    monkeypatch.setattr("receiver._outbox.REPLAY_IDS", 2)
    await ledger.set_endpoints([A])
    await lifecycle(ledger)
    await store_all(ledger)
    first = await send_all(ledger)
    heard: list[tuple[int, int]] = []
    since = "1970-01-01T00:00:00.000Z"
    queued = await ledger.replay(since, [], None, lambda done, total: heard.append((done, total)))
    assert queued == 5
    assert heard == [(2, 5), (4, 5), (5, 5)]
    again = await send_all(ledger)
    assert again == first


async def test_events_page_both_ways_and_filter(ledger: Ledger) -> None:
    await lifecycle(ledger)
    await ledger.apply(update(succeed("OTHER", images=1)))
    newest = await ledger.outbound_events(limit=2)
    assert [e.task_id for e in newest] == ["OTHER", T2V_ID]
    older = await ledger.outbound_events(before=newest[-1].id, limit=10)
    assert [e.id for e in older] == sorted((e.id for e in older), reverse=True)
    assert len(older) == 2
    mine = await ledger.outbound_events(after=0, task_id=T2V_ID)
    assert len(mine) == 3
    assert await ledger.outbound_events(after=0, type="task.archived") == []
    assert await ledger.delivery_log("msg_unknown") is None


async def test_files_near_expiry_are_warned_of_once(ledger: Ledger) -> None:
    created_ms = int((time.time() - 26 * 86400) * 1000)
    await ledger.apply(update(succeed("OLD", images=2, created_at=created_ms)))
    await ledger.apply(update(succeed("NEW", images=1, created_at=int(time.time() * 1000))))
    horizon = time.time() - 25 * 86400
    assert await ledger.warn_expiring(horizon, 1) == 1
    assert await ledger.warn_expiring(horizon, 10) == 1
    assert await ledger.warn_expiring(horizon, 10) == 0
    expiring = await ledger.outbound_events(after=0, type="asset.expiring")
    assert [e.task_id for e in expiring] == ["OLD", "OLD"]
    data = doc(expiring[0].body)["data"]
    assert data["expires_at"] < utc_in(5 * 86400) and data["state"] == "pending"
