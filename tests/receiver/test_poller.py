"""The poller in process: reconciling stale submissions, confirming held callbacks, giving up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from receiver._clock import utc_now
from receiver.database import open_ledger
from receiver.kling import KlingClient, client_for
from receiver.ledger import Ledger, Outcome, Update
from receiver.models import CallbackRef, Source, TaskStatus
from receiver.poller import Poller
from receiver.settings import Settings
from receiver.shapes import parse_task
from tests.fake_kling import FakeKling, result
from tests.support import (
    KLING_API_KEY,
    app_settings,
    fixture_json,
    free_port,
)

pytestmark = pytest.mark.anyio

T2V = "videos/text2video"
PARAMS = {"prompt": "a heron at dawn", "duration": "5"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def poll_settings(tmp_path: Path, base: str, **overrides: Any) -> Settings:
    return app_settings(
        tmp_path,
        **{
            "kling_api_base": base,
            "kling_api_key": KLING_API_KEY,
            "kling_retry_base_seconds": 0.01,
            "poll_after": 1,
            "poll_interval": 0.2,
            "poll_max_interval": 1,
            "submit_reconcile_after": 0.01,
        }
        | overrides,
    )


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    """The ledger on each backend (SQLite, PostgreSQL): every test using it runs on both."""
    async with open_ledger(ledger_url) as opened:
        yield opened


@pytest.fixture
async def client(tmp_path: Path, kling: FakeKling) -> AsyncIterator[KlingClient]:
    async with client_for(poll_settings(tmp_path, kling.base_url)) as made:
        yield made


@pytest.fixture
def poller(tmp_path: Path, kling: FakeKling, ledger: Ledger, client: KlingClient) -> Poller:
    return Poller(ledger, client, poll_settings(tmp_path, kling.base_url))


def counted(poller: Poller, name: str, **labels: str) -> float | None:
    """A sample of the poller's metrics, as /metrics would show it."""
    return poller.metrics.registry.get_sample_value(name, labels)


def callback(data: dict[str, Any], ext: str, *, confirm: bool = True) -> Update:
    """A delivery of `data` through the task's own callback URL."""
    return Update(
        task=parse_task(data),
        body=json.dumps(data).encode(),
        source=Source.callback,
        received_at=utc_now(),
        ref=CallbackRef(f"x-{ext}", T2V),
        poll_after=1.0,
        confirm=confirm,
    )


async def submitted(kling: FakeKling, ledger: Ledger, ext: str) -> str:
    """A task recorded as submitted here and known to the fake Kling; its task_id."""
    fake_task = kling.add_task(T2V, external_task_id=ext)
    await ledger.apply(callback(fake_task.as_json(), ext, confirm=False))
    return fake_task.task_id


async def test_a_stale_submission_kling_knows_is_reconciled_into_a_task(
    kling: FakeKling, ledger: Ledger, poller: Poller
) -> None:
    """Recorded, then the process died before Kling's answer: found by external_task_id."""
    ext = "kr-reconcile-found"
    await ledger.record_submission(T2V, PARAMS, ext, None)
    fake_task = kling.add_task(T2V, external_task_id=ext, status="processing")
    await asyncio.sleep(0.02)  # older than SUBMIT_RECONCILE_AFTER

    await poller.reconcile()

    assert [r.path for r in kling.queries()] == [f"/kling/v1/{T2V}/{ext}"]
    task = await ledger.task(fake_task.task_id)
    assert task is not None
    assert (task.status, task.external_task_id, task.action) == (TaskStatus.processing, ext, T2V)
    submission = await ledger.submission(ext)
    assert submission is not None
    assert (submission.state, submission.task_id) == ("accepted", fake_task.task_id)
    assert await ledger.claim_stale_submissions(0.0, 0.0) == []
    # Kling's callbacks through the URL given at submission now speak for this task.
    kling.advance(fake_task.task_id, "succeed", urls=["https://cdn.example/a.mp4"])
    applied = await ledger.apply(callback(kling.task(fake_task.task_id).as_json(), ext))
    assert applied.outcome is Outcome.held


async def test_a_stale_submission_kling_never_received_is_marked_lost(
    kling: FakeKling, ledger: Ledger, poller: Poller
) -> None:
    """Unknown to Kling (404, 1203): the submission is `lost` with a reason; no task appears."""
    ext = "kr-reconcile-lost"
    await ledger.record_submission(T2V, PARAMS, ext, None)
    await asyncio.sleep(0.02)

    await poller.reconcile()

    submission = await ledger.submission(ext)
    assert submission is not None
    assert submission.state == "lost"
    assert submission.error is not None and "never submitted" in submission.error
    assert (await ledger.tasks()).tasks == []
    await poller.reconcile()
    assert len(kling.queries()) == 1  # settled: not asked about again


async def test_a_fresh_submission_is_left_to_its_own_request(
    tmp_path: Path, kling: FakeKling, ledger: Ledger, client: KlingClient
) -> None:
    """A submission younger than SUBMIT_RECONCILE_AFTER may still get its answer: no query."""
    settings = poll_settings(tmp_path, kling.base_url, submit_reconcile_after=60)
    await ledger.record_submission(T2V, PARAMS, "kr-fresh", None)

    await Poller(ledger, client, settings).reconcile()

    assert kling.requests == []
    submission = await ledger.submission("kr-fresh")
    assert submission is not None and submission.state == "pending"


async def test_a_submission_stays_pending_while_kling_cannot_be_reached(
    tmp_path: Path, ledger: Ledger
) -> None:
    """No answer is not 'never submitted': the submission waits for the next round."""
    settings = poll_settings(tmp_path, f"http://127.0.0.1:{free_port()}/kling")
    await ledger.record_submission(T2V, PARAMS, "kr-unreachable", None)
    await asyncio.sleep(0.02)

    async with client_for(settings) as down:
        await Poller(ledger, down, settings).reconcile()

    submission = await ledger.submission("kr-unreachable")
    assert submission is not None and submission.state == "pending"


async def test_a_held_succeed_is_confirmed_by_one_verification_not_a_poll(
    kling: FakeKling, ledger: Ledger, poller: Poller
) -> None:
    """The confirming query counts as a verification; the end was learned from the callback."""
    ext = "kr-verified"
    task_id = await submitted(kling, ledger, ext)
    claimed = kling.advance(task_id, "succeed", urls=["https://cdn.example/v.mp4"]).as_json()
    assert (await ledger.apply(callback(claimed, ext))).outcome is Outcome.held
    assert (await ledger.task(task_id)).assets == ()  # type: ignore[union-attr]

    (job,) = await ledger.claim_polls(16, 120)
    assert job.verify
    await poller.poll(job)

    task = await ledger.task(task_id)
    assert task is not None
    assert task.status is TaskStatus.succeed and task.flag is None
    assert [a.url for a in task.assets] == ["https://cdn.example/v.mp4"]
    assert task.terminal_source is Source.callback
    assert await ledger.stats() == {
        "polls": 0,
        "verifications": 1,
        "recovered_by_polling": 0,
        "recovered_by_sweep": 0,
        "flagged": 0,
    }
    assert len(kling.queries(task_id)) == 1
    assert await ledger.claim_polls(16, 120) == []
    assert counted(poller, "kling_receiver_verifications_total") == 1
    assert counted(poller, "kling_receiver_polls_total", result="answered") == 1
    assert counted(poller, "kling_receiver_recoveries_total", source="poll") == 0


async def test_a_duplicated_succeed_does_not_put_off_its_confirmation(
    kling: FakeKling, ledger: Ledger
) -> None:
    """The same succeed twice (aggregators resend): the confirming query is still due now."""
    ext = "kr-dup-held"
    task_id = await submitted(kling, ledger, ext)
    claimed = kling.advance(task_id, "succeed", urls=["https://cdn.example/d.mp4"]).as_json()

    assert (await ledger.apply(callback(claimed, ext))).outcome is Outcome.held
    assert (await ledger.apply(callback(claimed, ext))).outcome is Outcome.duplicate
    late = kling.task(task_id).as_json() | {"task_status": "processing", "task_result": None}
    assert (await ledger.apply(callback(late, ext))).outcome is Outcome.moved

    jobs = await ledger.claim_polls(16, 120)
    assert [(j.task_id, j.verify) for j in jobs] == [(task_id, True)]


async def test_a_forged_succeed_gives_way_to_the_apis_files_and_flags_the_task(
    kling: FakeKling, ledger: Ledger, poller: Poller
) -> None:
    """A succeed naming other files than Kling's API: the API's are queued, the task flagged."""
    ext = "kr-forged"
    task_id = await submitted(kling, ledger, ext)
    real = kling.advance(task_id, "succeed", urls=["https://cdn.example/real.mp4"]).as_json()
    forged = real | {"task_result": result(task_id, T2V, ["https://evil.example/x.mp4"])}
    await ledger.apply(callback(forged, ext))

    (job,) = await ledger.claim_polls(16, 120)
    await poller.poll(job)

    task = await ledger.task(task_id)
    assert task is not None
    assert [a.url for a in task.assets] == ["https://cdn.example/real.mp4"]
    assert task.flag is not None and "other files" in task.flag
    assert (await ledger.stats())["flagged"] == 1


async def test_a_forged_succeed_while_kling_says_processing_queues_nothing(
    kling: FakeKling, ledger: Ledger, poller: Poller
) -> None:
    """Kling's API says processing: the task is not succeed, has no assets, and is flagged."""
    ext = "kr-premature"
    task_id = await submitted(kling, ledger, ext)
    kling.advance(task_id, "processing")
    forged = kling.task(task_id).as_json() | {
        "task_status": "succeed",
        "task_result": result(task_id, T2V, ["https://evil.example/y.mp4"]),
    }
    await ledger.apply(callback(forged, ext))

    (job,) = await ledger.claim_polls(16, 120)
    await poller.poll(job)

    task = await ledger.task(task_id)
    assert task is not None
    assert task.status is TaskStatus.processing
    assert task.assets == ()
    assert task.flag is not None and "processing" in task.flag
    assert await ledger.claim_polls(16, 120) == []  # next look after POLL_INTERVAL, not now


async def test_polling_gives_up_after_the_horizon_and_says_why(
    tmp_path: Path, kling: FakeKling, ledger: Ledger, client: KlingClient
) -> None:
    """Past POLL_GIVE_UP_HOURS a quiet task is not queried again, and status_msg says so."""
    settings = poll_settings(tmp_path, kling.base_url, poll_give_up_hours=1e-6)
    fake_task = kling.add_task(T2V, status="processing")
    await ledger.track(T2V, fake_task.task_id)
    await asyncio.sleep(0.01)

    (job,) = await ledger.claim_polls(16, 120)
    await Poller(ledger, client, settings).poll(job)

    assert kling.queries() == []
    task = await ledger.task(fake_task.task_id)
    assert task is not None and task.status_msg is not None
    assert "polling stopped" in task.status_msg and "track" in task.status_msg
    assert await ledger.claim_polls(16, 120) == []


async def test_a_query_kling_refuses_is_retried_later_with_the_reason_kept(
    kling: FakeKling, ledger: Ledger, poller: Poller
) -> None:
    """A task Kling does not know (1203) is looked at again later; status_msg says why."""
    await ledger.track(T2V, "867000000000000001")
    (job,) = await ledger.claim_polls(16, 120)

    await poller.poll(job)

    task = await ledger.task("867000000000000001")
    assert task is not None and task.status_msg is not None and "1203" in task.status_msg
    assert counted(poller, "kling_receiver_polls_total", result="failed") == 1
    await asyncio.sleep(0.25)  # POLL_INTERVAL
    assert [j.task_id for j in await ledger.claim_polls(16, 120)] == ["867000000000000001"]


def test_the_interval_doubles_while_polls_bring_nothing_and_stops_at_the_maximum(
    tmp_path: Path,
) -> None:
    """0.2 s, 0.4 s, 0.8 s, then POLL_MAX_INTERVAL (1 s) from there on."""
    settings = poll_settings(tmp_path, "http://127.0.0.1:9/kling")
    poller = Poller(None, None, settings)  # type: ignore[arg-type]
    assert [poller.interval(n) for n in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert poller.interval(10_000) == 1.0


async def test_a_succeed_through_a_url_without_an_action_is_not_held_forever(
    ledger: Ledger,
) -> None:
    """A hand-made URL with no action cannot be queried, so its succeed is applied at once."""
    data = fixture_json("callback_text2video_succeed.json")
    update = Update(
        task=parse_task(data),
        body=json.dumps(data).encode(),
        source=Source.callback,
        received_at=utc_now(),
        ref=CallbackRef("h-0123456789abcdef", None),
        confirm=True,
    )

    applied = await ledger.apply(update)

    assert (applied.outcome, applied.assets_created) == (Outcome.moved, 1)
    task = await ledger.task(data["task_id"])
    assert task is not None and task.status is TaskStatus.succeed
    assert task.terminal_source is Source.callback


async def test_tracking_a_task_polling_gave_up_on_queries_it_again(
    tmp_path: Path, kling: FakeKling, ledger: Ledger, client: KlingClient
) -> None:
    """After a give-up, `track` (what the note advises) starts the give-up horizon again."""
    settings = poll_settings(tmp_path, kling.base_url, poll_give_up_hours=0.5 / 3600)
    poller = Poller(ledger, client, settings)
    fake_task = kling.add_task(T2V, status="processing")
    await ledger.track(T2V, fake_task.task_id)
    await asyncio.sleep(0.55)
    (job,) = await ledger.claim_polls(16, 120)
    await poller.poll(job)
    assert kling.queries() == []

    assert await ledger.track(T2V, fake_task.task_id) is False
    (job,) = await ledger.claim_polls(16, 120)
    await poller.poll(job)

    assert len(kling.queries(fake_task.task_id)) == 1
    task = await ledger.task(fake_task.task_id)
    assert task is not None and task.status is TaskStatus.processing


async def test_a_poll_that_queues_files_wakes_the_downloads(
    tmp_path: Path, kling: FakeKling, ledger: Ledger, client: KlingClient
) -> None:
    """When an answer queues files the downloader is told at once, not at its next idle tick."""
    woken: list[None] = []
    poller = Poller(
        ledger,
        client,
        poll_settings(tmp_path, kling.base_url),
        on_files=lambda: woken.append(None),
    )
    ext = "kr-wakes"
    task_id = await submitted(kling, ledger, ext)
    claimed = kling.advance(task_id, "succeed", urls=["https://cdn.example/w.mp4"]).as_json()
    await ledger.apply(callback(claimed, ext))
    assert woken == []

    (job,) = await ledger.claim_polls(16, 120)
    await poller.poll(job)
    assert len(woken) == 1


async def test_an_end_learned_by_polling_counts_as_a_recovery(
    kling: FakeKling, ledger: Ledger, poller: Poller
) -> None:
    """A tracked task that Kling says has succeeded was recovered by polling, once."""
    fake_task = kling.add_task(T2V, status="processing")
    kling.advance(fake_task.task_id, "succeed", urls=["https://cdn.example/r.mp4"])
    await ledger.track(T2V, fake_task.task_id)
    (job,) = await ledger.claim_polls(16, 120)

    await poller.poll(job)

    assert counted(poller, "kling_receiver_recoveries_total", source="poll") == 1
    assert counted(poller, "kling_receiver_polls_total", result="answered") == 1
    assert counted(poller, "kling_receiver_verifications_total") == 0
