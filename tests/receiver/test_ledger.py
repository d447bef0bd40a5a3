"""The ledger's contract on real SQLite and real PostgreSQL: the state machine, duplicates,
bindings, durability and paging. Every test taking `ledger` or `db_url` runs on both backends;
the ones about SQLite's files and migrations take `sqlite_url` and run on SQLite only."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from receiver._clock import utc_in, utc_now
from receiver._postgres import PostgresLedger
from receiver._sqlite import MIGRATIONS
from receiver.database import open_ledger, sqlite_path
from receiver.ledger import (
    AssetResult,
    Ledger,
    LedgerUnavailable,
    Outcome,
    Update,
)
from receiver.models import (
    AssetKind,
    AssetState,
    CallbackRef,
    Source,
    TaskStatus,
)
from receiver.shapes import parse_task
from tests.pg_server import PostgresServer
from tests.support import fixture_bytes, fixture_json

pytestmark = pytest.mark.anyio

T2V = "videos/text2video"
T2V_REF = CallbackRef("x-kr_01JDX3N5Q8", T2V)  # the URL the text2video fixtures were sent to
T2V_ID = "867283741759111202"
VIDEO_URL = "https://cdn.klingai.com/bs2/upload-kling-api/1/{}.mp4"
IMAGE_URL = "https://cdn.klingai.com/bs2/upload-kling-api/1/{}.png"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/l.db"


@pytest.fixture
def db_url(ledger_url: str) -> str:
    """A fresh database of each backend: a SQLite file, or a new PostgreSQL database."""
    return ledger_url


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[Ledger]:
    async with open_ledger(db_url) as opened:
        yield opened


def update(
    body: bytes | dict[str, Any],
    ref: CallbackRef | None = None,
    source: Source = Source.callback,
    **extra: Any,
) -> Update:
    """An Update as the callback route would build it from these bytes."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Update(
        task=parse_task(json.loads(raw)),
        body=raw,
        source=source,
        received_at=utc_now(),
        ref=ref,
        **extra,
    )


def body(task_id: str, status: str, updated_at: int | None = None, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"task_id": task_id, "task_status": status, "task_status_msg": ""}
    if updated_at is not None:
        data["updated_at"] = updated_at
    return data | fields


def succeed(
    task_id: str, videos: int = 0, images: int = 0, updated_at: int = 1000, **fields: Any
) -> dict[str, Any]:
    result = {
        "videos": [{"id": f"{task_id}_{n}", "url": VIDEO_URL.format(n)} for n in range(videos)],
        "images": [{"index": n, "url": IMAGE_URL.format(n)} for n in range(images)],
    }
    return body(task_id, "succeed", updated_at, task_result=result, **fields)


def channel(name: str = "a") -> CallbackRef:
    return CallbackRef(f"h-{name}", None)


async def test_lifecycle_creates_one_pending_asset_per_video(ledger: Ledger) -> None:
    """submitted, processing, succeed move the task forward and queue its video once."""
    outcomes = []
    for name in ("submitted", "processing", "succeed"):
        applied = await ledger.apply(
            update(fixture_bytes(f"callback_text2video_{name}.json"), T2V_REF)
        )
        outcomes.append((applied.outcome, applied.status, applied.assets_created))
    assert outcomes == [
        (Outcome.moved, TaskStatus.submitted, 0),
        (Outcome.moved, TaskStatus.processing, 0),
        (Outcome.moved, TaskStatus.succeed, 1),
    ]
    task = await ledger.task(T2V_ID)
    assert task is not None
    assert task.status is TaskStatus.succeed
    assert task.status_msg == ""
    assert task.external_task_id == "kr_01JDX3N5Q8"
    assert task.action == T2V
    assert task.kling_updated_at == 1764043501877
    assert task.terminal_source is Source.callback
    assert task.updates == 3
    assert not task.archived
    [asset] = task.assets
    assert (asset.kind, asset.index, asset.state, asset.attempts) == (
        AssetKind.video,
        0,
        AssetState.pending,
        0,
    )
    [video] = fixture_json("callback_text2video_succeed.json")["task_result"]["videos"]
    assert asset.url == video["url"]
    assert (asset.location, asset.sha256, asset.size, asset.stored_at) == (None, None, None, None)
    events = await ledger.events(T2V_ID)
    assert events is not None
    assert [(e.status, e.applied, e.times_received) for e in events] == [
        ("submitted", True, 1),
        ("processing", True, 1),
        ("succeed", True, 1),
    ]


async def test_every_image_and_video_gets_one_pending_asset(ledger: Ledger) -> None:
    """A succeed naming videos and images queues one pending asset for each file."""
    applied = await ledger.apply(update(succeed("t1", videos=2, images=3), channel()))
    assert applied.assets_created == 5
    task = await ledger.task("t1")
    assert task is not None
    assert sorted((a.kind, a.index, a.url) for a in task.assets) == sorted(
        [(AssetKind.video, n, VIDEO_URL.format(n)) for n in range(2)]
        + [(AssetKind.image, n, IMAGE_URL.format(n)) for n in range(3)]
    )
    assert {a.state for a in task.assets} == {AssetState.pending}


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("callback_images_generations_succeed.json", 2),
        ("callback_images_aggregator_variant.json", 1),
        ("callback_virtual_try_on_succeed.json", 1),
        ("callback_video_extend_succeed.json", 1),
        ("callback_future_fields.json", 1),
    ],
)
async def test_succeed_fixtures_queue_their_files(ledger: Ledger, name: str, count: int) -> None:
    """Each sample succeed callback queues exactly the files it names."""
    data = fixture_json(name)
    applied = await ledger.apply(update(fixture_bytes(name), channel()))
    assert (applied.outcome, applied.assets_created) == (Outcome.moved, count)
    task = await ledger.task(data["task_id"])
    assert task is not None and len(task.assets) == count


async def test_deliveries_are_kept_verbatim(ledger: Ledger) -> None:
    """The exact bytes, source, kept headers and remote address of a delivery are stored."""
    raw = fixture_bytes("callback_future_fields.json")
    headers = {"content-type": "application/json", "user-agent": "kling"}
    await ledger.apply(update(raw, channel(), headers=headers, remote="203.0.113.9"))
    [event] = await ledger.events("867283741759111500") or []
    assert event.body == raw
    assert event.source is Source.callback
    assert event.headers == headers
    assert event.remote == "203.0.113.9"
    assert event.task_id == "867283741759111500"


async def test_duplicates_are_recorded_once(ledger: Ledger) -> None:
    """The same bytes three times make one event received three times and one update."""
    raw = fixture_bytes("callback_text2video_processing.json")
    outcomes = [(await ledger.apply(update(raw, T2V_REF))).outcome for _ in range(3)]
    assert outcomes == [Outcome.moved, Outcome.duplicate, Outcome.duplicate]
    [event] = await ledger.events(T2V_ID) or []
    assert event.times_received == 3
    assert event.last_received_at >= event.received_at
    task = await ledger.task(T2V_ID)
    assert task is not None
    assert (task.updates, task.status) == (1, TaskStatus.processing)


async def test_same_content_in_other_bytes_is_a_new_event(ledger: Ledger) -> None:
    """A re-serialised copy of a delivery is a distinct event, kept without moving anything."""
    data = fixture_json("callback_text2video_processing.json")
    first = await ledger.apply(update(json.dumps(data).encode(), T2V_REF))
    second = await ledger.apply(update(json.dumps(data, indent=2).encode(), T2V_REF))
    assert first.outcome is Outcome.moved
    assert second.outcome in (Outcome.moved, Outcome.kept)  # the digest breaks the tie
    events = await ledger.events(T2V_ID)
    assert events is not None and len(events) == 2
    task = await ledger.task(T2V_ID)
    assert task is not None and task.updates == 2


async def test_duplicate_succeed_queues_assets_once(ledger: Ledger) -> None:
    """A succeed delivered twice does not queue its files twice."""
    raw = fixture_bytes("callback_images_generations_succeed.json")
    first = await ledger.apply(update(raw, channel()))
    again = await ledger.apply(update(raw, channel()))
    assert (first.assets_created, again.outcome, again.assets_created) == (
        2,
        Outcome.duplicate,
        0,
    )
    task = await ledger.task("CjMT7WdSwWcAAAAAALvB3g")
    assert task is not None and len(task.assets) == 2


async def test_processing_after_succeed_does_not_regress(ledger: Ledger) -> None:
    """A late processing delivery is recorded but leaves a succeeded task succeeded."""
    await ledger.apply(update(fixture_bytes("callback_text2video_succeed.json"), T2V_REF))
    late = await ledger.apply(update(fixture_bytes("callback_text2video_processing.json"), T2V_REF))
    assert (late.outcome, late.status, late.assets_created) == (
        Outcome.kept,
        TaskStatus.succeed,
        0,
    )
    task = await ledger.task(T2V_ID)
    assert task is not None
    assert (task.status, task.kling_updated_at, task.updates) == (
        TaskStatus.succeed,
        1764043501877,
        2,
    )
    assert len(task.assets) == 1
    events = await ledger.events(T2V_ID)
    assert events is not None
    assert [(e.status, e.applied) for e in events] == [("succeed", True), ("processing", False)]


async def test_failed_is_final(ledger: Ledger) -> None:
    """After failed, neither a later processing nor a succeed changes the task or queues files."""
    failed = fixture_json("callback_text2video_failed.json")
    task_id = failed["task_id"]
    ref = CallbackRef("x-kr_01JDX3N5Q9", T2V)
    await ledger.apply(update(failed, ref))
    later = [
        body(task_id, "processing", failed["updated_at"] + 1),
        succeed(task_id, videos=1, updated_at=failed["updated_at"] + 2),
    ]
    for data in later:
        applied = await ledger.apply(update(data, ref, source=Source.poll))
        assert (applied.outcome, applied.status) == (Outcome.kept, TaskStatus.failed)
    task = await ledger.task(task_id)
    assert task is not None
    assert task.status is TaskStatus.failed
    assert task.status_msg == "Failure to pass the risk control system"
    assert task.terminal_source is Source.callback
    assert task.assets == ()
    assert task.updates == 3


async def test_unknown_status_is_recorded_but_not_applied(ledger: Ledger) -> None:
    """A status word the service does not know is kept as an event and leaves the status alone."""
    await ledger.apply(update(body("t1", "processing", 10), channel()))
    applied = await ledger.apply(update(body("t1", "queued_v2", 20), channel()))
    assert (applied.outcome, applied.status) == (Outcome.kept, TaskStatus.processing)
    task = await ledger.task("t1")
    assert task is not None
    assert (task.status, task.kling_updated_at, task.updates) == (TaskStatus.processing, 10, 2)
    events = await ledger.events("t1")
    assert events is not None
    assert [(e.status, e.applied) for e in events] == [("processing", True), ("queued_v2", False)]


async def test_task_first_seen_with_an_unknown_status(ledger: Ledger) -> None:
    """A task first heard of with an unknown status exists, with no status, until a known one."""
    applied = await ledger.apply(update(body("t1", "queued_v2", 5), channel()))
    assert (applied.outcome, applied.status) == (Outcome.kept, None)
    task = await ledger.task("t1")
    assert task is not None
    assert (task.status, task.updates, task.kling_updated_at) == (None, 1, None)
    assert [t.task_id for t in (await ledger.tasks()).tasks] == ["t1"]

    applied = await ledger.apply(update(body("t1", "submitted", 1), channel()))
    assert (applied.outcome, applied.status) == (Outcome.moved, TaskStatus.submitted)
    task = await ledger.task("t1")
    assert task is not None and task.status is TaskStatus.submitted


@pytest.mark.parametrize("late_first", [True, False])
async def test_updated_at_breaks_ties_between_processing_deliveries(
    ledger: Ledger, late_first: bool
) -> None:
    """Of two processing deliveries, the later updated_at wins whatever order they arrive in."""
    early = body("t1", "processing", 100, task_status_msg="early")
    late = body("t1", "processing", 200, task_status_msg="late")
    first, second = (late, early) if late_first else (early, late)
    await ledger.apply(update(first, channel()))
    applied = await ledger.apply(update(second, channel()))
    assert applied.outcome is (Outcome.kept if late_first else Outcome.moved)
    task = await ledger.task("t1")
    assert task is not None
    assert (task.status_msg, task.kling_updated_at, task.updates) == ("late", 200, 2)


async def test_submitted_after_processing_does_not_regress(ledger: Ledger) -> None:
    """A submitted delivery arriving after processing, even with a later time, is only kept."""
    await ledger.apply(update(body("t1", "processing", 100), channel()))
    applied = await ledger.apply(update(body("t1", "submitted", 900), channel()))
    assert applied.outcome is Outcome.kept
    task = await ledger.task("t1")
    assert task is not None and task.status is TaskStatus.processing


async def test_task_bound_to_one_url_refuses_another(ledger: Ledger) -> None:
    """A task first heard through URL A is refused through URL B, and nothing is recorded."""
    await ledger.apply(update(body("t1", "submitted", 1), channel("a")))
    refused = await ledger.apply(update(body("t1", "succeed", 9), channel("b")))
    assert refused.outcome is Outcome.refused
    assert refused.reason == "this task reports to another callback URL"
    task = await ledger.task("t1")
    assert task is not None
    assert (task.status, task.updates) == (TaskStatus.submitted, 1)
    events = await ledger.events("t1")
    assert events is not None and len(events) == 1
    accepted = await ledger.apply(update(body("t1", "processing", 5), channel("a")))
    assert accepted.outcome is Outcome.moved


async def test_polls_are_never_refused_by_binding(ledger: Ledger) -> None:
    """An update from a poll is applied to a task bound to a callback URL."""
    await ledger.apply(update(body("t1", "submitted", 1), channel("a")))
    applied = await ledger.apply(update(body("t1", "processing", 5), source=Source.poll))
    assert applied.outcome is Outcome.moved


async def test_task_url_refuses_another_external_task_id(ledger: Ledger) -> None:
    """A URL made for external_task_id X refuses a body whose task_info names Y."""
    ref = CallbackRef("x-X", T2V)
    data = body("t1", "submitted", 1, task_info={"external_task_id": "Y"})
    refused = await ledger.apply(update(data, ref))
    assert refused.outcome is Outcome.refused
    assert refused.reason is not None and "external_task_id differs" in refused.reason
    assert await ledger.task("t1") is None
    assert await ledger.events("t1") is None


async def test_task_url_refuses_a_second_task(ledger: Ledger) -> None:
    """A URL made for one task, once it has spoken for task T, refuses task U."""
    ref = CallbackRef("x-E", T2V)
    first = await ledger.apply(update(body("T", "submitted", 1), ref))
    assert first.outcome is Outcome.moved
    for task_info in ({}, {"task_info": {"external_task_id": "E"}}):
        refused = await ledger.apply(update(body("U", "succeed", 9, **task_info), ref))
        assert refused.outcome is Outcome.refused
        assert refused.reason == "this callback URL belongs to another task"
    assert await ledger.task("U") is None
    task = await ledger.task("T")
    assert task is not None
    assert (task.external_task_id, task.status) == ("E", TaskStatus.submitted)


async def test_task_url_outranks_a_hand_made_url_heard_first(ledger: Ledger) -> None:
    """A task first heard through an h- URL is taken over by its own x- URL, which binds it."""
    await ledger.apply(update(body("T", "processing", 5), channel("any")))
    applied = await ledger.apply(update(body("T", "submitted", 1), CallbackRef("x-E", T2V)))
    # What the h- URL said no longer counts: the task's own URL is judged as the first.
    assert (applied.outcome, applied.status) == (Outcome.moved, TaskStatus.submitted)
    task = await ledger.task("T")
    assert task is not None
    assert (task.external_task_id, task.action, task.updates) == ("E", T2V, 2)
    events = await ledger.events("T")
    assert events is not None and len(events) == 2
    refused = await ledger.apply(update(body("T", "succeed", 9), channel("any")))
    assert refused.reason == "this task reports to another callback URL"


async def test_a_state_planted_through_a_hand_made_url_does_not_hold_the_task(
    ledger: Ledger,
) -> None:
    """A final state and files from an h- URL give way to the task's own URL's deliveries."""
    await ledger.apply(
        update(succeed("T", videos=2, task_info={"external_task_id": "F"}), channel())
    )
    ref = CallbackRef("x-E", T2V)
    taken = await ledger.apply(update(body("T", "processing", 5), ref))
    assert (taken.outcome, taken.status) == (Outcome.moved, TaskStatus.processing)
    task = await ledger.task("T")
    assert task is not None
    assert (task.status, task.external_task_id, task.assets) == (TaskStatus.processing, "E", ())
    done = await ledger.apply(update(succeed("T", videos=1), ref))
    assert (done.outcome, done.assets_created) == (Outcome.moved, 1)


async def test_task_url_takes_its_id_from_a_task_that_named_it_by_hand(ledger: Ledger) -> None:
    """An external_task_id another task named through an h- URL goes to the task of its x- URL."""
    await ledger.apply(
        update(body("U", "submitted", 1, task_info={"external_task_id": "E"}), channel())
    )
    applied = await ledger.apply(update(body("T", "submitted", 1), CallbackRef("x-E", T2V)))
    assert applied.outcome is Outcome.moved
    t, u = await ledger.task("T"), await ledger.task("U")
    assert t is not None and u is not None
    assert (t.external_task_id, u.external_task_id) == ("E", None)


async def test_a_submission_outranks_a_hand_made_url_heard_first(ledger: Ledger) -> None:
    """A task heard through an h- URL before its submission learned its id joins that submission."""
    await ledger.record_submission(T2V, {"prompt": "p"}, "E", None)
    await ledger.apply(update(body("T", "processing", 5), channel()))
    answered = update(body("T", "submitted", 1), CallbackRef("x-E", T2V), source=Source.submit)
    assert (await ledger.apply(answered)).outcome is Outcome.moved
    submission = await ledger.submission("E")
    assert submission is not None
    assert (submission.task_id, submission.state) == ("T", "accepted")
    events = await ledger.events("T")
    assert events is not None and [e.source for e in events] == [Source.callback, Source.submit]
    refused = await ledger.apply(update(body("T", "succeed", 9), channel()))
    assert refused.reason == "this task reports to another callback URL"


async def test_a_stale_submission_is_claimed_by_one_reconciler_at_a_time(
    ledger: Ledger,
) -> None:
    """Pending past the cutoff: claimed in order, then held; an answered one is done with."""
    for ext in ("E", "F"):
        await ledger.record_submission(T2V, {"prompt": "p"}, ext, None)
    assert await ledger.claim_stale_submissions(3600.0, 60.0) == []  # not stale yet

    lapsed = await ledger.claim_stale_submissions(0.0, 0.0)  # a hold that lapses at once
    assert [s.external_task_id for s in lapsed] == ["E", "F"]
    answered = update(body("T", "submitted", 1), CallbackRef("x-E", T2V), source=Source.submit)
    await ledger.apply(answered)

    again = await ledger.claim_stale_submissions(0.0, 60.0)
    assert [s.external_task_id for s in again] == ["F"]
    assert await ledger.claim_stale_submissions(0.0, 60.0) == []  # held by that claim


async def test_a_hand_made_url_never_takes_a_task_from_its_own_url(ledger: Ledger) -> None:
    """A task bound to its x- URL, or submitted by the service, refuses every h- URL."""
    await ledger.apply(update(body("T", "submitted", 1), CallbackRef("x-E", T2V)))
    await ledger.record_submission(T2V, {"prompt": "p"}, "F", None)
    await ledger.apply(
        update(body("U", "submitted", 1), CallbackRef("x-F", T2V), source=Source.submit)
    )
    for task_id in ("T", "U"):
        refused = await ledger.apply(update(body(task_id, "failed", 9), channel()))
        assert refused.reason == "this task reports to another callback URL"
        task = await ledger.task(task_id)
        assert task is not None and task.status is TaskStatus.submitted


async def test_task_url_takes_its_id_from_the_url(ledger: Ledger) -> None:
    """A task heard through a task URL is recorded under the URL's external_task_id."""
    await ledger.apply(update(body("T", "submitted", 1), CallbackRef("x-E", None)))
    task = await ledger.task("T")
    assert task is not None
    assert (task.external_task_id, task.action) == ("E", None)


async def test_shared_external_task_id_does_not_lose_a_delivery(ledger: Ledger) -> None:
    """A second task naming an external_task_id another task holds is still recorded."""
    first = body("T", "submitted", 1, task_info={"external_task_id": "E"})
    second = body("U", "submitted", 1, task_info={"external_task_id": "E"})
    await ledger.apply(update(first, channel()))
    for source_ref, source in ((channel(), Source.callback), (None, Source.poll)):
        applied = await ledger.apply(update(second, source_ref, source=source))
        # The poll's copy is its own event: deliveries are deduplicated per source.
        assert applied.outcome in (Outcome.moved, Outcome.kept)
    u = await ledger.task("U")
    t = await ledger.task("T")
    assert u is not None and t is not None
    assert (t.external_task_id, u.external_task_id) == ("E", None)
    assert u.status is TaskStatus.submitted


async def test_many_concurrent_deliveries_are_all_recorded(ledger: Ledger) -> None:
    """1000 deliveries for 100 tasks applied at once are each recorded and applied in order."""
    deliveries = []
    for n in range(100):
        task_id = f"task{n:03d}"
        ref = CallbackRef(f"x-ext{n}", T2V)
        deliveries.append(update(body(task_id, "submitted", 1), ref))
        deliveries += [update(body(task_id, "processing", t), ref) for t in range(2, 10)]
        deliveries.append(update(succeed(task_id, videos=1), ref))
    random.Random(0).shuffle(deliveries)
    results = await asyncio.gather(*(ledger.apply(d) for d in deliveries))
    assert Outcome.refused not in {r.outcome for r in results}
    assert Outcome.duplicate not in {r.outcome for r in results}
    assert sum(r.assets_created for r in results) == 100
    for n in range(100):
        task = await ledger.task(f"task{n:03d}")
        assert task is not None
        assert (task.status, task.updates, len(task.assets)) == (TaskStatus.succeed, 10, 1)
        assert task.external_task_id == f"ext{n}"
        events = await ledger.events(f"task{n:03d}")
        assert events is not None and len(events) == 10


async def test_data_survives_reopening(db_url: str) -> None:
    """What was recorded is there after the ledger is closed and opened again."""
    raw = fixture_bytes("callback_text2video_succeed.json")
    async with open_ledger(db_url) as ledger:
        await ledger.apply(update(raw, T2V_REF))
    async with open_ledger(db_url) as ledger:
        task = await ledger.task(T2V_ID)
        assert task is not None
        assert (task.status, task.updates, len(task.assets)) == (TaskStatus.succeed, 1, 1)
        [event] = await ledger.events(T2V_ID) or []
        assert event.body == raw
        again = await ledger.apply(update(raw, T2V_REF))
        assert again.outcome is Outcome.duplicate


async def test_closed_ledger_refuses_work(db_url: str) -> None:
    """A closed ledger raises LedgerUnavailable rather than hanging."""
    async with open_ledger(db_url) as ledger:
        await ledger.ping()
    with pytest.raises(LedgerUnavailable):
        await ledger.apply(update(body("t1", "submitted"), channel()))
    with pytest.raises(LedgerUnavailable):
        await ledger.task("t1")
    with pytest.raises(LedgerUnavailable):
        await ledger.ping()


async def test_unknown_task_reads_as_none(ledger: Ledger) -> None:
    """An unknown task has no record and no events."""
    assert await ledger.task("nope") is None
    assert await ledger.events("nope") is None


async def test_list_is_paged_newest_first(ledger: Ledger) -> None:
    """Tasks are listed newest first, a page at a time, until the cursor runs out."""
    for n in range(5):
        await ledger.apply(update(body(f"t{n}", "submitted", 1), channel(str(n))))
    pages = []
    cursor = None
    while True:
        page = await ledger.tasks(limit=2, cursor=cursor)
        pages.append([task.task_id for task in page.tasks])
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == [["t4", "t3"], ["t2", "t1"], ["t0"]]
    assert [t.task_id for t in (await ledger.tasks()).tasks] == ["t4", "t3", "t2", "t1", "t0"]


async def test_a_full_last_page_has_no_cursor(ledger: Ledger) -> None:
    """When the tasks fill the last page exactly, no cursor to an empty page is given."""
    for n in range(4):
        await ledger.apply(update(body(f"t{n}", "submitted", 1), channel(str(n))))
    first = await ledger.tasks(limit=2)
    second = await ledger.tasks(limit=2, cursor=first.next_cursor)
    assert [t.task_id for t in second.tasks] == ["t1", "t0"]
    assert second.next_cursor is None


async def test_list_filters_by_status(ledger: Ledger) -> None:
    """A status filter lists only tasks in that status, newest first, across pages."""
    statuses = ["submitted", "processing", "failed", "processing", "processing", "submitted"]
    for n, status in enumerate(statuses):
        await ledger.apply(update(body(f"t{n}", status, 1), channel(str(n))))
    first = await ledger.tasks(status=TaskStatus.processing, limit=2)
    assert [t.task_id for t in first.tasks] == ["t4", "t3"]
    second = await ledger.tasks(status=TaskStatus.processing, limit=2, cursor=first.next_cursor)
    assert [t.task_id for t in second.tasks] == ["t1"]
    assert second.next_cursor is None
    failed = await ledger.tasks(status=TaskStatus.failed)
    assert [t.task_id for t in failed.tasks] == ["t2"]
    assert (await ledger.tasks(status=TaskStatus.succeed)).tasks == []
    unarchived = await ledger.tasks(archived=False)
    assert len(unarchived.tasks) == 6
    assert (await ledger.tasks(archived=True)).tasks == []


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "%%%",
        _b64("nope"),
        _b64("id:"),
        _b64("id:abc"),
        _b64("id:" + "9" * 30),
        base64.urlsafe_b64encode(b"id:\xff").decode(),
    ],
)
async def test_bad_cursor_raises_value_error(ledger: Ledger, cursor: str) -> None:
    """A cursor this service did not hand out is a ValueError, whatever it decodes to."""
    await ledger.apply(update(body("t1", "submitted"), channel()))
    with pytest.raises(ValueError, match="cursor is not one this service returned"):
        await ledger.tasks(cursor=cursor)


@pytest.mark.parametrize(
    "url",
    [
        # A PostgreSQL URL opens the PostgreSQL backend, where nothing answers on port 1.
        "postgresql://kling:hunter2@127.0.0.1:1/kling",
        "mysql:///kling.db",
        "sqlite://host/kling.db",
        "sqlite:",
        "data/kling-receiver.db",
        "",
    ],
)
async def test_sqlite_path_rejects_other_urls(url: str) -> None:
    """A DATABASE_URL that is not sqlite:///file is LedgerUnavailable, without its password."""
    with pytest.raises(LedgerUnavailable, match="DATABASE_URL must look like") as caught:
        sqlite_path(url)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(LedgerUnavailable) as opening:
        async with open_ledger(url):
            pass
    assert "hunter2" not in str(opening.value)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///data/kling-receiver.db", Path("data/kling-receiver.db")),
        ("sqlite:////var/lib/kling/l.db", Path("/var/lib/kling/l.db")),
        ("sqlite:///my%20data/l.db", Path("my data/l.db")),
    ],
)
async def test_sqlite_path_reads_relative_and_absolute_files(url: str, path: Path) -> None:
    """sqlite:///relative and sqlite:////absolute name the file they spell."""
    assert sqlite_path(url) == path


async def test_unopenable_database_is_unavailable(tmp_path: Path) -> None:
    """A database file that cannot be created raises LedgerUnavailable."""
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(LedgerUnavailable, match="cannot open the database"):
        async with open_ledger(f"sqlite:///{tmp_path}/file/l.db"):
            pass


async def test_assets_of_a_version_3_database_survive_the_variant_migration(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Migration 4 rebuilds the assets table: every row keeps its state, as variant ''."""
    conn = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    try:
        for number, statements in enumerate(MIGRATIONS[:3], start=1):
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number:d}")
        now = utc_now()
        conn.execute(
            "INSERT INTO tasks (task_id, action, status, created_at, updated_at) "
            "VALUES ('t-old', 'videos/text2video', 'succeed', ?, ?)",
            (now, now),
        )
        conn.execute(
            "INSERT INTO assets (task_pk, kind, idx, url, state, sha256, created_at, updated_at) "
            "VALUES (1, 'video', 0, 'https://cdn.example/0.mp4', 'stored', 'ab', ?, ?)",
            (now, now),
        )
    finally:
        conn.close()

    async with open_ledger(sqlite_url) as ledger:
        task = await ledger.task("t-old")
    assert task is not None
    (asset,) = task.assets
    assert (asset.kind, asset.index, asset.variant, asset.group_id) == (
        AssetKind.video,
        0,
        "",
        None,
    )
    assert (asset.state, asset.sha256) == (AssetState.stored, "ab")


async def test_migrations_leave_a_current_wal_database(sqlite_url: str, tmp_path: Path) -> None:
    """After opening, the schema is at the last migration and the journal is WAL, and stays so."""
    for _ in range(2):
        async with open_ledger(sqlite_url) as ledger:
            await ledger.ping()
        conn = sqlite3.connect(tmp_path / "l.db")
        try:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            assert {"tasks", "events", "assets"} <= tables
        finally:
            conn.close()


async def test_several_processes_open_one_database_at_once(db_url: str) -> None:
    """Ledgers opened together on one new database migrate it once and share what they hold."""
    async with contextlib.AsyncExitStack() as stack:
        ledgers = await asyncio.gather(
            *(stack.enter_async_context(open_ledger(db_url)) for _ in range(4))
        )
        await ledgers[0].apply(update(body("shared", "submitted"), channel()))
        for ledger in ledgers:
            task = await ledger.task("shared")
            assert task is not None and task.status is TaskStatus.submitted


async def test_a_postgresql_that_goes_away_is_unavailable_until_it_returns(
    postgres: PostgresServer,
) -> None:
    """While PostgreSQL is down, ping and writes raise LedgerUnavailable (callbacks answer
    503); once it is back, the same ledger works again within seconds, without being
    reopened, however long its pool has been backing off."""
    async with PostgresLedger(postgres.create_database(), timeout=1.0) as ledger:
        await ledger.apply(update(body("before", "submitted"), channel()))
        with postgres.stopped():
            with pytest.raises(LedgerUnavailable):
                await ledger.ping()
            with pytest.raises(LedgerUnavailable):
                await ledger.apply(update(body("during", "submitted"), channel()))
            with pytest.raises(LedgerUnavailable):
                await ledger.claim_asset("worker", 30)
            await asyncio.sleep(6)  # long enough for the pool's reconnection to back off
        back = asyncio.get_running_loop().time()
        while True:
            try:
                await ledger.ping()
                break
            except LedgerUnavailable:
                assert asyncio.get_running_loop().time() - back < 8, "did not come back"
        applied = await ledger.apply(update(body("after", "submitted"), channel()))
        assert applied.outcome is Outcome.moved
        assert await ledger.task("before") is not None
        assert await ledger.task("during") is None


async def test_connections_a_postgresql_restart_dropped_cost_no_failed_call(
    postgres: PostgresServer,
) -> None:
    """The pool's connections die with a restart; the first calls after it get live ones."""
    async with PostgresLedger(postgres.create_database(), timeout=5.0) as ledger:
        await asyncio.gather(*(ledger.ping() for _ in range(4)))  # several idle connections
        postgres.restart("immediate")
        applied = await ledger.apply(update(body("after", "submitted"), channel()))
        assert applied.outcome is Outcome.moved
        await asyncio.gather(*(ledger.ping() for _ in range(4)))


async def test_claims_take_lapsed_leases_then_new_jobs_then_due_retries(ledger: Ledger) -> None:
    """The asset queue's order on every backend: a lapsed lease is taken over first, then new
    jobs, then retries that are due; a retry not yet due waits; the lapsed lease's first
    holder can no longer settle it, its new holder can."""
    await ledger.apply(update(succeed("q", videos=4), channel()))
    jobs = [await ledger.claim_asset("w1", 30) for _ in range(2)]
    first, second = [job for job in jobs if job is not None]
    assert (first.index, second.index) == (0, 1)
    due = AssetResult(AssetState.pending, error="busy", retry_at=utc_in(-1))
    assert await ledger.settle_asset(first.asset_id, "w1", due)  # video 0: a due retry
    not_yet = AssetResult(AssetState.pending, error="busy", retry_at=utc_in(60))
    assert await ledger.settle_asset(second.asset_id, "w1", not_yet)  # video 1: waits
    lapsing = await ledger.claim_asset("w2", -1)  # video 2: its lease has lapsed already
    assert lapsing is not None and lapsing.index == 2

    claimed = [await ledger.claim_asset("w3", 30) for _ in range(4)]
    assert [None if job is None else job.index for job in claimed] == [2, 3, 0, None]
    stored = AssetResult(AssetState.stored, location="x", sha256="ab", size=1, stored_at=utc_now())
    assert not await ledger.settle_asset(lapsing.asset_id, "w2", stored)
    taken_over = claimed[0]
    assert taken_over is not None and taken_over.asset_id == lapsing.asset_id
    assert await ledger.settle_asset(taken_over.asset_id, "w3", stored)
    task = await ledger.task("q")
    assert task is not None
    assert [asset.state for asset in task.assets] == [
        AssetState.downloading,
        AssetState.pending,
        AssetState.stored,
        AssetState.downloading,
    ]


async def test_files_stored_at_once_by_two_workers_archive_their_task(ledger: Ledger) -> None:
    """Two workers storing a task's last two files at the same moment: the task is archived
    (neither may miss the other's file), on every backend."""
    stored = AssetResult(AssetState.stored, location="x", sha256="ab", size=1, stored_at=utc_now())
    for n in range(20):
        await ledger.apply(update(succeed(f"pair{n}", videos=2), channel(str(n))))
        jobs = [await ledger.claim_asset(f"w{k}", 30) for k in range(2)]
        assert all(job is not None for job in jobs)
        settled = await asyncio.gather(
            *(
                ledger.settle_asset(job.asset_id, f"w{k}", stored)
                for k, job in enumerate(jobs)
                if job
            )
        )
        assert settled == [True, True]
        task = await ledger.task(f"pair{n}")
        assert task is not None and task.archived, n


async def test_text_with_nul_characters_is_recorded_as_it_came(ledger: Ledger) -> None:
    """A message or status holding NUL characters (which PostgreSQL's text cannot hold) is
    recorded and read back as delivered, on every backend, not refused forever."""
    odd = "a\x00b \ue000 \ue000\ue001 \\0"
    applied = await ledger.apply(update(body("nul", "processing", 1, task_status_msg=odd)))
    assert applied.outcome is Outcome.moved
    unknown = await ledger.apply(update(body("nul", "weird\x00status", 2)))
    assert unknown.outcome is Outcome.kept
    task = await ledger.task("nul")
    assert task is not None and task.status_msg == odd
    events = await ledger.events("nul") or []
    assert [event.status for event in events] == ["processing", "weird\x00status"]


async def test_backlog_counts_unfinished_work_its_age_and_first_expiry(ledger: Ledger) -> None:
    """The backlog counts unfinished tasks and unstored assets, the oldest of each, and when the
    first unstored file expires (Kling's creation time + 30 days); finished work is left out."""
    empty = await ledger.backlog()
    assert (empty.tasks, empty.oldest_task_at, empty.oldest_pending_at) == ({}, None, None)
    assert empty.assets == {
        AssetState.pending: 0,
        AssetState.downloading: 0,
        AssetState.failed: 0,
    }
    assert empty.expires_at is None

    await ledger.apply(update(body("slow", "processing", 1000), channel("s")))
    await ledger.apply(update(body("gone", "failed", 1000), channel("g")))
    assert await ledger.track(T2V, "tracked")  # no status heard yet
    await ledger.apply(update(succeed("files", videos=3, created_at=1_700_000_000_000)))
    await ledger.apply(update(succeed("early", images=1, created_at=1_600_000_000_000)))
    await ledger.apply(update(succeed("done", images=1, created_at=1_500_000_000_000)))
    jobs = [await ledger.claim_asset("w", 30) for _ in range(5)]
    by_task = {job.task_id: job for job in reversed(jobs) if job is not None}
    stored = AssetResult(AssetState.stored, location="x", sha256="ab", size=1, stored_at=utc_now())
    assert await ledger.settle_asset(by_task["done"].asset_id, "w", stored)
    given_up = AssetResult(AssetState.failed, error="gone")
    assert await ledger.settle_asset(by_task["early"].asset_id, "w", given_up)

    found = await ledger.backlog()
    slow = await ledger.task("slow")
    files = await ledger.task("files")
    assert slow is not None and files is not None
    assert found.tasks == {"processing": 1, "unknown": 1}
    assert found.oldest_task_at == slow.created_at
    assert found.assets == {
        AssetState.pending: 0,
        AssetState.downloading: 3,
        AssetState.failed: 1,
    }
    assert found.oldest_pending_at is not None
    assert found.oldest_pending_at >= slow.created_at
    # The failed image is not stored either: its file goes first, a "done" one does not count.
    assert found.expires_at == 1_600_000_000 + 30 * 24 * 3600
