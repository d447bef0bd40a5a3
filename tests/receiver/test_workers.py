"""Download workers against a real SQLite ledger and a misbehaving media server on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

from receiver._clock import parse_time, utc_now
from receiver.app import create_app
from receiver.database import open_ledger, sqlite_path
from receiver.ledger import AssetJob, AssetResult, Ledger, LedgerUnavailable, Update
from receiver.models import (
    AssetKind,
    AssetRecord,
    AssetState,
    CallbackRef,
    PayloadError,
    Source,
    TaskRecord,
)
from receiver.settings import Settings
from receiver.shapes import parse_task
from receiver.workers import Downloader, RetryPolicy, asset_stem, downloader_for
from storage import MAX_RETRY_AFTER, FetchError, LocalSink, LocalWriter, SinkError, UrlPolicy
from tests.media_server import Cut, MediaServer, Serve, Short, Status, Trickle, media_bytes
from tests.support import ADMIN_TOKEN, app_settings, succeed_payload

pytestmark = pytest.mark.anyio

T2V = "videos/text2video"
IMAGES = "images/generations"
# Retries come due in tens of milliseconds; loopback is allowed unless a test says otherwise.
FAST = {"download_retry_base_seconds": 0.05, "allow_private_downloads": True}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The suite's settings; for a test using the ledger, on its backend (`ledger_url`)."""
    made = app_settings(tmp_path)
    if "ledger_url" in request.fixturenames:
        made = made.model_copy(update={"database_url": request.getfixturevalue("ledger_url")})
    return made


@pytest.fixture
async def ledger(settings: Settings, ledger_url: str) -> AsyncIterator[Ledger]:
    """The ledger on each backend (SQLite, PostgreSQL): every test using it runs on both."""
    async with open_ledger(settings.database_url) as opened:
        yield opened


def payload(n: int = 1, like: str = "mp4") -> bytes:
    """n distinct bytes that start like a file of the format `like` (an MP4, a PNG)."""
    return media_bytes(n, n, like)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pool(settings: Settings, ledger: Ledger, concurrency: int = 1, **overrides: Any) -> Downloader:
    """The Downloader that these settings (made fast, plus overrides) describe."""
    return downloader_for(settings.model_copy(update=FAST | overrides), ledger, concurrency)


async def queue(ledger: Ledger, task_id: str, urls: list[str], action: str = T2V) -> None:
    """Apply a succeed delivery naming these URLs (videos, or images for an images/ action)."""
    data = succeed_payload(task_id, urls, action)
    data.pop("task_info")
    raw = json.dumps(data).encode()
    ref = CallbackRef("h-workers", action) if action.startswith(("images/", "videos/")) else None
    update = Update(
        task=parse_task(data),
        body=raw,
        source=Source.callback,
        received_at=utc_now(),
        ref=ref,
        action=action,
    )
    applied = await ledger.apply(update)
    assert applied.assets_created == len(urls)


async def due(ledger: Ledger, owner: str, lease: float = 30.0, within: float = 5.0) -> AssetJob:
    """Claim the next job, waiting (briefly) for a retry to come due."""
    deadline = time.monotonic() + within
    while True:
        job = await ledger.claim_asset(owner, lease)
        if job is not None:
            return job
        assert time.monotonic() < deadline, "no job came due"
        await asyncio.sleep(0.01)


async def attempt(downloader: Downloader) -> AssetJob:
    """Claim the next due job and download it once, as one worker iteration does."""
    job = await due(downloader.ledger, downloader.owner)
    await downloader.process(job)
    return job


async def task(ledger: Ledger, task_id: str) -> TaskRecord:
    record = await ledger.task(task_id)
    assert record is not None
    return record


async def asset(ledger: Ledger, task_id: str, index: int = 0) -> AssetRecord:
    return (await task(ledger, task_id)).assets[index]


async def until(check: Any, within: float = 10.0) -> None:
    """Wait until the async predicate holds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def task_dir(settings: Settings, task_id: str, action: str = T2V) -> Path:
    return Path(settings.storage_url) / action / task_id


def content(location: str | None) -> bytes:
    """The bytes of a stored file."""
    assert location is not None
    return Path(location).read_bytes()


def sidecar_of(location: str | None) -> dict[str, Any]:
    assert location is not None
    data: dict[str, Any] = json.loads(Path(location + ".json").read_text())
    return data


def escaped(root: Path, pattern: str = "*escape*") -> list[Path]:
    """Anything (file or directory) under `root` named like the escape attempts."""
    return list(root.rglob(pattern))


def files(directory: Path) -> list[str]:
    """Every file under `directory` (hidden ones too), relative, sorted."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


async def test_server_errors_are_retried_until_stored(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """Three 500s then a 200 end stored, with the right sha256, after four attempts."""
    body = payload(50_000)
    url = media.add("/v.mp4", body, [Status(500), Status(500), Status(500), Serve()])
    await queue(ledger, "t500", [url])
    downloader = pool(settings, ledger)

    for tries in (1, 2, 3):
        await attempt(downloader)
        failed = await asset(ledger, "t500")
        assert failed.state is AssetState.pending
        assert failed.attempts == tries
        assert failed.error is not None and "HTTP 500" in failed.error
    await attempt(downloader)

    stored = await asset(ledger, "t500")
    assert stored.state is AssetState.stored
    assert stored.attempts == 4
    assert stored.error is None
    assert (stored.sha256, stored.size) == (sha(body), len(body))
    assert content(stored.location) == body
    assert stored.location == str(task_dir(settings, "t500") / "0.mp4")
    assert len(media.hits("/v.mp4")) == 4
    registry = downloader.metrics.registry
    for outcome, count in (("retry", 3), ("stored", 1), ("failed", 0)):
        labels = {"outcome": outcome}
        assert registry.get_sample_value("kling_receiver_downloads_total", labels) == count
        assert registry.get_sample_value("kling_receiver_download_seconds_count", labels) == count
    assert registry.get_sample_value("kling_receiver_downloaded_bytes_total") == len(body)


async def test_not_found_fails_after_the_configured_tries(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A URL that answers 404 forever fails after DOWNLOAD_NOT_FOUND_TRIES, saying why."""
    await queue(ledger, "t404", [media.url("/gone.mp4")])
    downloader = pool(settings, ledger, download_not_found_tries=3)

    for _ in range(3):
        await attempt(downloader)

    failed = await asset(ledger, "t404")
    assert failed.state is AssetState.failed
    assert failed.attempts == 3
    assert failed.error is not None and "404" in failed.error
    assert "try again" not in failed.error
    assert failed.location is None
    assert await ledger.claim_asset("anyone", 30) is None
    assert len(media.hits("/gone.mp4")) == 3
    assert files(task_dir(settings, "t404")) == []  # no file, no .part
    registry = downloader.metrics.registry
    assert registry.get_sample_value("kling_receiver_downloads_total", {"outcome": "failed"}) == 1
    assert registry.get_sample_value("kling_receiver_downloaded_bytes_total") == 0


async def test_retry_after_is_honoured(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A 429 with `Retry-After: 2` is not tried again for about two seconds."""
    body = payload(1000)
    url = media.add("/busy.mp4", body, [Status(429, {"Retry-After": "2"}), Serve()])
    await queue(ledger, "t429", [url])
    downloader = pool(settings, ledger)

    before = datetime.now(UTC)
    await attempt(downloader)
    after = datetime.now(UTC)

    waiting = await asset(ledger, "t429")
    assert waiting.state is AssetState.pending
    assert waiting.error is not None and "429" in waiting.error
    scheduled = next_attempt_at(settings)
    tolerance = timedelta(milliseconds=5)
    assert before + timedelta(seconds=2) - tolerance <= scheduled <= after + timedelta(seconds=2)
    assert await ledger.claim_asset(downloader.owner, 30) is None

    job = await due(ledger, downloader.owner, within=4)
    await downloader.process(job)

    first, second = media.hits("/busy.mp4")
    assert 1.95 <= second.at - first.at <= 3.0
    assert (await asset(ledger, "t429")).state is AssetState.stored


async def test_short_body_is_never_stored(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A body shorter than its Content-Length is retried, never stored as it came."""
    body = payload(65_536)
    url = media.add("/short.mp4", body, [Short(1000), Short(30_000), Serve()])
    await queue(ledger, "tshort", [url])
    downloader = pool(settings, ledger)

    for _ in range(2):
        await attempt(downloader)
        short = await asset(ledger, "tshort")
        assert short.state is AssetState.pending
        assert short.location is None and short.sha256 is None
        assert short.error is not None and "of 65536 bytes" in short.error
        assert not [f for f in files(task_dir(settings, "tshort")) if not f.startswith(".")]
    await attempt(downloader)

    stored = await asset(ledger, "tshort")
    assert stored.state is AssetState.stored
    assert stored.sha256 == sha(body)
    assert content(stored.location) == body


async def test_too_large_fails_and_leaves_no_part_file(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A file over MAX_ASSET_BYTES fails at once and the bytes held for a resume are removed."""
    body = payload(10_000)
    url = media.add("/big.mp4", body, [Cut(2000), Serve()])
    await queue(ledger, "tbig", [url])
    await attempt(pool(settings, ledger))  # cut: 2000 bytes held to resume from
    held = files(task_dir(settings, "tbig"))
    assert held == [".0.part", ".0.part.json"]

    await attempt(pool(settings, ledger, max_asset_bytes=4096))

    failed = await asset(ledger, "tbig")
    assert failed.state is AssetState.failed
    assert failed.error is not None and "4096" in failed.error
    assert files(task_dir(settings, "tbig")) == []
    assert await ledger.claim_asset("anyone", 30) is None
    assert len(media.hits("/big.mp4")) == 2


async def test_cut_download_resumes_with_range(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A download cut off midway resumes from the bytes on disk with a Range request."""
    body = payload(300_000)
    url = media.add("/cut.mp4", body, [Cut(120_000), Serve()])
    await queue(ledger, "tcut", [url])
    downloader = pool(settings, ledger)

    await attempt(downloader)
    await attempt(downloader)

    stored = await asset(ledger, "tcut")
    assert stored.state is AssetState.stored
    assert stored.sha256 == sha(body)
    assert content(stored.location) == body
    first, second = media.hits("/cut.mp4")
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=120000-"
    assert files(task_dir(settings, "tcut")) == ["0.mp4", "0.mp4.json"]


async def test_private_address_is_refused_and_the_worker_carries_on(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """With ALLOW_PRIVATE_DOWNLOADS off a loopback URL fails with a reason; the pool keeps going."""
    body = payload(2000)
    url = media.add("/private.mp4", body)
    downloader = pool(settings, ledger, allow_private_downloads=False)
    assert downloader.idle_seconds <= 1
    running = asyncio.create_task(downloader.run())
    try:
        await queue(ledger, "tprivate", [url])
        await queue(ledger, "tlocalhost", [url.replace("127.0.0.1", "localhost")])
        downloader.wake()

        async def refused() -> bool:
            states = [(await asset(ledger, t)).state for t in ("tprivate", "tlocalhost")]
            return states == [AssetState.failed, AssetState.failed]

        await until(refused)
        for task_id in ("tprivate", "tlocalhost"):
            failed = await asset(ledger, task_id)
            assert failed.attempts == 1
            assert failed.error is not None
            assert "not a public address" in failed.error
            assert "ALLOW_PRIVATE_DOWNLOADS" in failed.error
        assert media.hits("/private.mp4") == []

        # The same running pool, now allowed loopback, stores the next job.
        downloader.policy = UrlPolicy(allow_private=True)
        await queue(ledger, "tallowed", [url])
        downloader.wake()

        async def archived() -> bool:
            return (await task(ledger, "tallowed")).archived

        await until(archived)
        assert not running.done()
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    assert (await asset(ledger, "tallowed")).sha256 == sha(body)


@pytest.mark.parametrize("action", ["../x", "videos/../../x", "/tmp/x", "videos/..", "./videos"])
async def test_unsafe_storage_keys_are_refused(
    settings: Settings, action: str, tmp_path: Path
) -> None:
    """asset_stem keeps hostile text in the key, and the sink refuses any key that could escape."""
    sink = LocalSink(Path(settings.storage_url))
    stem = asset_stem(action, "t1", AssetKind.video, 0)

    with pytest.raises(SinkError):
        sink.open(stem)
    with pytest.raises(SinkError):
        sink.path(stem + ".mp4")
    assert escaped(tmp_path, "*") == []  # not even a directory was made


@pytest.mark.parametrize("task_id", ["..", "../x", ".hidden", "a/b", "a\\b", "", "x" * 129])
def test_hostile_task_ids_are_refused_at_the_edge(task_id: str) -> None:
    """A task id that could name a path is refused when the delivery is parsed."""
    with pytest.raises(PayloadError):
        parse_task({"task_id": task_id, "task_status": "succeed"})


async def test_hostile_action_writes_nothing_outside_storage(
    settings: Settings, ledger: Ledger, media: MediaServer, tmp_path: Path
) -> None:
    """An asset whose recorded action would climb out of the storage dir is never written."""
    url = media.add("/escape.mp4", payload(1000))
    await queue(ledger, "tescape", [url], action="../../escape")

    await attempt(pool(settings, ledger))

    refused = await asset(ledger, "tescape")
    assert refused.state is not AssetState.stored
    assert refused.location is None
    assert refused.error is not None and refused.error.startswith("unsafe storage key")
    assert escaped(tmp_path) == []
    assert media.hits("/escape.mp4") == []


async def test_hostile_url_path_stays_inside_storage(
    settings: Settings, ledger: Ledger, media: MediaServer, tmp_path: Path
) -> None:
    """Dot-dot segments in the URL name nothing on disk: the file is `<action>/<task>/<index>`."""
    body = payload(1000)
    path = "/a/..%2F..%2F..%2F..%2Fescape.sh%2F..%2Fx.png"
    url = media.add(path, body, [Serve(content_type="application/octet-stream")])
    await queue(ledger, "turl", [url])

    await attempt(pool(settings, ledger))

    stored = await asset(ledger, "turl")
    assert stored.state is AssetState.stored
    assert stored.location == str(task_dir(settings, "turl") / "0.png")
    assert files(task_dir(settings, "turl")) == ["0.png", "0.png.json"]
    assert escaped(tmp_path) == []


async def test_sidecar_describes_the_file(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """Each stored file has a JSON sidecar naming its task, action, source, hash, size and type."""
    body = payload(4321, "png")
    url = media.add("/img.png", body, [Serve(content_type="image/png")])
    await queue(ledger, "tside", [url], action=IMAGES)

    await attempt(pool(settings, ledger))

    stored = await asset(ledger, "tside")
    assert stored.location == str(task_dir(settings, "tside", IMAGES) / "0.png")
    sidecar = sidecar_of(stored.location)
    assert sidecar["task_id"] == "tside"
    assert sidecar["action"] == IMAGES
    assert sidecar["source_url"] == url
    assert sidecar["sha256"] == sha(body) == stored.sha256
    assert sidecar["size"] == len(body) == stored.size
    assert sidecar["content_type"] == "image/png" == stored.content_type
    assert sidecar["stored_at"] == stored.stored_at
    assert abs(parse_time(sidecar["stored_at"]) - datetime.now(UTC)) < timedelta(minutes=1)


async def test_task_is_archived_once_every_asset_is_stored(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A task is archived when its last asset is stored, and the API lists it as archived."""
    urls = [media.add(f"/arch/{n}.png", payload(100 + n, "png")) for n in range(2)]
    await queue(ledger, "tarch", urls, action=IMAGES)
    await queue(ledger, "tother", [media.url("/arch/missing.png")], action=IMAGES)
    downloader = pool(settings, ledger)

    await attempt(downloader)
    half = await task(ledger, "tarch")
    assert [a.state for a in half.assets] == [AssetState.stored, AssetState.pending]
    assert half.archived_at is None
    await attempt(downloader)

    done = await task(ledger, "tarch")
    assert done.archived_at is not None
    assert [a.state for a in done.assets] == [AssetState.stored] * 2
    with TestClient(create_app(settings)) as client:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        archived = client.get("/api/tasks", params={"archived": "true"}, headers=admin)
        active = client.get("/api/tasks", params={"archived": "false"}, headers=admin)
    assert archived.status_code == 200
    assert [t["task_id"] for t in archived.json()["tasks"]] == ["tarch"]
    assert archived.json()["tasks"][0]["archived_at"] == done.archived_at
    assert [t["task_id"] for t in active.json()["tasks"]] == ["tother"]


async def test_requeue_queues_failed_assets_again(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A failed asset is queued again from scratch by requeue, and then stored."""
    url = media.url("/late.mp4")
    await queue(ledger, "tlate", [url])
    downloader = pool(settings, ledger, download_not_found_tries=1)
    await attempt(downloader)
    assert (await asset(ledger, "tlate")).state is AssetState.failed
    body = payload(5000)
    media.add("/late.mp4", body)

    assert await ledger.requeue("tlate") == 1

    queued = await asset(ledger, "tlate")
    assert (queued.state, queued.attempts, queued.error) == (AssetState.pending, 0, None)
    await attempt(downloader)
    stored = await task(ledger, "tlate")
    assert stored.assets[0].state is AssetState.stored
    assert stored.assets[0].sha256 == sha(body)
    assert stored.archived
    assert await ledger.requeue("tlate") == 0  # nothing failed: nothing queued
    assert await ledger.requeue("no-such-task") is None


async def test_requeue_restarts_the_retry_horizon(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """After a requeue, transient errors are retried again rather than failing at once."""
    body = payload(3000)
    url = media.add("/flaky.mp4", body, [Status(503), Status(503), Serve()])
    await queue(ledger, "tflaky", [url])
    downloader = pool(settings, ledger, download_retry_hours=0.5 / 3600)
    await asyncio.sleep(0.6)  # older than the (half-second) retry horizon
    await attempt(downloader)
    assert (await asset(ledger, "tflaky")).state is AssetState.failed

    assert await ledger.requeue("tflaky") == 1
    await attempt(downloader)

    retrying = await asset(ledger, "tflaky")
    assert retrying.state is AssetState.pending, retrying.error
    await attempt(downloader)
    assert (await asset(ledger, "tflaky")).sha256 == sha(body)


async def test_forced_requeue_refetches_and_notes_changed_bytes(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """--force fetches a stored asset again; changed bytes replace the file and are noted."""
    old, new = payload(7000), payload(7001)
    url = media.add("/again.mp4", old)
    await queue(ledger, "tagain", [url])
    downloader = pool(settings, ledger)
    await attempt(downloader)
    assert await ledger.requeue("tagain") == 0  # stored assets need --force

    assert await ledger.requeue("tagain", force=True) == 1
    assert not (await task(ledger, "tagain")).archived
    await attempt(downloader)
    same = await asset(ledger, "tagain")
    assert (same.state, same.sha256, same.error) == (AssetState.stored, sha(old), None)

    media.add("/again.mp4", new)
    assert await ledger.requeue("tagain", force=True) == 1
    await attempt(downloader)

    changed = await task(ledger, "tagain")
    record = changed.assets[0]
    assert record.state is AssetState.stored
    assert record.sha256 == sha(new)
    assert record.error is not None and "differ" in record.error and sha(old) in record.error
    assert content(record.location) == new
    assert sidecar_of(record.location)["sha256"] == sha(new)
    assert changed.archived
    assert len(media.hits("/again.mp4")) == 3


async def test_forced_recheck_that_cannot_fetch_keeps_the_stored_copy(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A --force re-check that meets a 404 for good leaves the asset stored and says why."""
    body = payload(7100)
    url = media.add("/expired.mp4", body)
    await queue(ledger, "texpired", [url])
    downloader = pool(settings, ledger)
    await attempt(downloader)
    stored = await asset(ledger, "texpired")

    media.add("/expired.mp4", body, [Status(404)])
    assert await ledger.requeue("texpired", force=True) == 1
    for _ in range(settings.download_not_found_tries):
        await attempt(downloader)
        if (await asset(ledger, "texpired")).state is not AssetState.pending:
            break

    kept = await task(ledger, "texpired")
    record = kept.assets[0]
    assert record.state is AssetState.stored
    assert (record.location, record.sha256) == (stored.location, sha(body))
    assert record.error is not None and "re-check failed" in record.error and "404" in record.error
    assert content(record.location) == body
    assert kept.archived


async def test_expired_lease_is_taken_over_and_the_late_settle_refused(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A job whose lease ran out goes to another worker; the first one's outcome is not recorded."""
    await queue(ledger, "tlease", [media.url("/lease.mp4")])
    job_a = await ledger.claim_asset("worker-a", 0.2)
    assert job_a is not None
    assert await ledger.claim_asset("worker-b", 30) is None  # the lease still holds

    await asyncio.sleep(0.25)
    job_b = await ledger.claim_asset("worker-b", 30)

    assert job_b is not None and job_b.asset_id == job_a.asset_id
    assert await ledger.renew_lease(job_a.asset_id, "worker-a", 30) is False
    late = AssetResult(AssetState.failed, error="worker-a gave up")
    assert await ledger.settle_asset(job_a.asset_id, "worker-a", late) is False
    assert (await asset(ledger, "tlease")).state is AssetState.downloading
    assert await ledger.renew_lease(job_b.asset_id, "worker-b", 30) is True
    done = AssetResult(AssetState.stored, location="/x", sha256="0" * 64, size=1)
    assert await ledger.settle_asset(job_b.asset_id, "worker-b", done) is True
    settled = await asset(ledger, "tlease")
    assert (settled.state, settled.error, settled.attempts) == (AssetState.stored, None, 1)


async def test_two_pools_on_one_ledger_fetch_each_asset_once(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """Two Downloaders sharing a ledger fetch each of 20 assets exactly once."""
    bodies = {
        f"/two/{t}/{n}.png": payload(1000 + 10 * t + n, "png") for t in range(10) for n in (0, 1)
    }
    for path, body in bodies.items():
        media.add(path, body, [Serve(content_type="image/png")])
    pools = [pool(settings, ledger, concurrency=3), pool(settings, ledger, concurrency=3)]
    assert pools[0].owner != pools[1].owner
    runs = [asyncio.create_task(p.run()) for p in pools]
    try:
        for t in range(10):
            await queue(ledger, f"two{t}", [media.url(f"/two/{t}/{n}.png") for n in (0, 1)], IMAGES)
        for p in pools:
            p.wake()

        async def all_archived() -> bool:
            return len((await ledger.tasks(archived=True)).tasks) == 10

        await until(all_archived)
    finally:
        for run in runs:
            run.cancel()
        for run in runs:
            with pytest.raises(asyncio.CancelledError):
                await run
    assert {path: len(media.hits(path)) for path in bodies} == dict.fromkeys(bodies, 1)
    for t in range(10):
        stored = await task(ledger, f"two{t}")
        for n, record in enumerate(stored.assets):
            assert record.attempts == 1
            assert record.sha256 == sha(bodies[f"/two/{t}/{n}.png"])


async def test_every_worker_downloads_at_once(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """More workers than the event loop's default thread pool holds all download together."""
    workers = min(32, (os.cpu_count() or 1) + 4) + 2
    paths = [f"/wide/{n}.png" for n in range(workers)]
    for n, path in enumerate(paths):
        media.add(path, payload(96_000 + n, "png"), [Serve(rate=32_000, content_type="image/png")])
    await queue(ledger, "twide", [media.url(path) for path in paths], IMAGES)
    downloader = pool(settings, ledger, concurrency=workers)
    running = asyncio.create_task(downloader.run())
    try:

        async def all_started() -> bool:
            return all(media.hits(path) for path in paths)

        await until(all_started, within=2.5)  # each answer takes 3 s
        assert not any(hit.ended for path in paths for hit in media.hits(path))
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running


async def test_cancelled_download_is_handed_back_and_resumed(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """Stopping the pool mid-download hands the job back uncounted, and the next try resumes."""
    body = payload(4 << 20)
    url = media.add("/slow.mp4", body, [Serve(rate=4 << 20), Serve()])
    await queue(ledger, "tslow", [url])
    downloader = pool(settings, ledger)
    running = asyncio.create_task(downloader.run())
    downloader.wake()
    part = task_dir(settings, "tslow") / ".0.part"

    async def started() -> bool:
        return part.exists() and part.stat().st_size >= 1 << 20

    try:
        await until(started)
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    handed_back = await asset(ledger, "tslow")
    assert (handed_back.state, handed_back.attempts) == (AssetState.pending, 0)
    sizes = []

    async def settled() -> bool:  # the thread stops after its current 1 MiB read
        sizes.append(part.stat().st_size)
        return len(sizes) > 25 and sizes[-1] == sizes[-25]

    await until(settled)
    held = sizes[-1]
    assert 1 << 20 <= held < len(body)

    await attempt(pool(settings, ledger))

    stored = await asset(ledger, "tslow")
    assert (stored.state, stored.sha256, stored.attempts) == (AssetState.stored, sha(body), 1)
    assert media.hits("/slow.mp4")[-1].headers["Range"] == f"bytes={held}-"
    assert files(task_dir(settings, "tslow")) == ["0.mp4", "0.mp4.json"]


class SettleOutage:
    """A ledger whose first `refusals` settle_asset calls raise LedgerUnavailable, as they
    do while PostgreSQL is down; everything else goes to the real ledger."""

    def __init__(self, ledger: Ledger, refusals: int) -> None:
        self.ledger = ledger
        self.refusals = refusals

    async def settle_asset(self, asset_id: int, owner: str, result: AssetResult) -> bool:
        if self.refusals:
            self.refusals -= 1
            raise LedgerUnavailable("the database did not answer: connection refused")
        return await self.ledger.settle_asset(asset_id, owner, result)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ledger, name)


async def test_a_download_done_while_the_ledger_is_away_is_recorded_when_it_returns(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A file stored while its outcome cannot be recorded is recorded once the ledger answers
    again, not left for its lease to lapse and be fetched a second time."""
    body = payload(50_000)
    url = media.add("/away.mp4", body)
    await queue(ledger, "taway", [url])
    downloader = dataclasses.replace(pool(settings, ledger), ledger=SettleOutage(ledger, 2))

    await asyncio.wait_for(attempt(downloader), 10)

    stored = await asset(ledger, "taway")
    assert (stored.state, stored.sha256, stored.attempts) == (AssetState.stored, sha(body), 1)
    assert (await task(ledger, "taway")).archived_at is not None
    assert await ledger.claim_asset("another-worker", 30) is None
    assert len(media.hits("/away.mp4")) == 1


class FlakySink(LocalSink):
    """A local sink whose storage comes and goes: `problem` is what check() says, and while
    `refuse` is set, opening a writer fails as a bucket with refused credentials does."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.problem: str | None = "the bucket refused the credentials"
        self.refuse = False
        self.checks = 0

    def check(self) -> str | None:
        self.checks += 1
        return self.problem

    def open(self, stem: str) -> LocalWriter:
        if self.refuse:
            raise SinkError(stem, "credentials refused", unavailable=True)
        return super().open(stem)


async def test_pool_waits_while_the_storage_cannot_take_files(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """No job is claimed while the sink's check fails; a download that finds the sink gone
    has it checked again at once, and the pool pauses until the check passes."""
    body = payload(50_000)
    await queue(ledger, "tgate", [media.add("/gate.mp4", body)])
    sink = FlakySink(Path(settings.storage_url))
    # STORAGE_CHECK_SECONDS: the pool checks again every 0.05 s while the storage is away.
    downloader = dataclasses.replace(pool(settings, ledger, storage_check_seconds=0.05), sink=sink)
    running = asyncio.create_task(downloader.run())
    try:
        await until(_true_when(lambda: sink.checks >= 3))
        assert downloader.storage_problem == "the bucket refused the credentials"
        waiting = await asset(ledger, "tgate")
        assert (waiting.state, waiting.attempts) == (AssetState.pending, 0)
        assert media.hits("/gate.mp4") == []

        sink.refuse = True  # the check passes but the first real write finds it gone
        sink.problem = None
        await until(_true_when(lambda: downloader.storage_problem is None))
        await until(_true_when(lambda: sink.checks >= 5))  # re-checked after the failure

        async def refused() -> bool:
            # The check is asked for before the attempt is recorded: wait for the record.
            failed = await asset(ledger, "tgate")
            return failed.state is AssetState.pending and "credentials refused" in (
                failed.error or ""
            )

        await until(refused)

        sink.refuse = False
        downloader.wake()

        async def stored() -> bool:
            return (await asset(ledger, "tgate")).state is AssetState.stored

        await until(stored)
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    assert (await asset(ledger, "tgate")).sha256 == sha(body)


def _true_when(predicate: Any) -> Any:
    async def check() -> bool:
        return bool(predicate())

    return check


def next_attempt_at(settings: Settings) -> datetime:
    """When the test's one asset is due to be tried again, read from either backend."""
    query = "SELECT next_attempt_at FROM assets"
    if settings.database_url.startswith("postgresql:"):
        with psycopg.connect(settings.database_url) as pg:
            found = pg.execute(query).fetchone()
    else:
        with closing(sqlite3.connect(sqlite_path(settings.database_url))) as db:
            found = db.execute(query).fetchone()
    assert found is not None
    return parse_time(found[0])


@pytest.mark.parametrize(
    "value", ["99999999999999999999", "Fri, 31 Dec 9999 23:59:59 GMT", "999999"]
)
async def test_a_hostile_retry_after_waits_an_hour_at_most(
    settings: Settings, ledger: Ledger, media: MediaServer, value: str
) -> None:
    """A Retry-After of ages (or past what a timestamp holds) schedules the next try within
    the hour, and the asset is kept pending, not crashed or parked."""
    url = media.add("/later.mp4", payload(1000), [Status(503, {"Retry-After": value})])
    await queue(ledger, "tlater", [url])

    await attempt(pool(settings, ledger))

    waiting = await asset(ledger, "tlater")
    assert waiting.state is AssetState.pending
    assert waiting.error is not None and "503" in waiting.error
    hour = timedelta(seconds=MAX_RETRY_AFTER)
    assert next_attempt_at(settings) <= datetime.now(UTC) + hour


async def test_a_retry_after_past_the_horizon_is_tried_at_its_end(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """Retry-After: 99999999999999999999 with a 2 s horizon: the next try comes at the horizon's
    end, in the same process, and stores the file."""
    body = payload(2000)
    hostile = Status(503, {"Retry-After": "99999999999999999999"})
    url = media.add("/huge.mp4", body, [hostile, Serve()])
    queued = datetime.now(UTC)
    await queue(ledger, "thuge", [url])
    downloader = pool(settings, ledger, download_retry_hours=2 / 3600)

    await attempt(downloader)
    assert next_attempt_at(settings) <= datetime.now(UTC) + timedelta(seconds=2)
    assert next_attempt_at(settings) >= queued + timedelta(seconds=1.9)
    job = await due(ledger, downloader.owner, within=4)
    await downloader.process(job)

    stored = await asset(ledger, "thuge")
    assert (stored.state, stored.sha256) == (AssetState.stored, sha(body))


def test_retry_waits_stop_at_the_horizon() -> None:
    """A wait is clamped to what is left of the horizon; past it, the asset fails."""
    policy = RetryPolicy(base_delay=0.01, horizon=100.0)
    busy = FetchError("u", "HTTP 503", retry=True, status=503, retry_after=MAX_RETRY_AFTER)
    seen = datetime.now(UTC) - timedelta(seconds=40)
    delay = policy.delay(busy, 1, seen)
    assert delay is not None and 59 <= delay <= 60
    assert policy.delay(busy, 1, datetime.now(UTC) - timedelta(seconds=101)) is None
    backoff = RetryPolicy(base_delay=1000.0, max_delay=1000.0, horizon=100.0)
    plain = FetchError("u", "HTTP 503", retry=True, status=503)
    waited = backoff.delay(plain, 1, datetime.now(UTC))
    assert waited is not None and waited <= 100


@dataclasses.dataclass(frozen=True)
class BrokenRetry(RetryPolicy):
    """A retry policy whose decision raises, as a timestamp overflow once did."""

    def delay(self, error: Any, attempts: int, first_seen: datetime) -> float | None:
        raise OverflowError("timestamp out of range for platform time_t")


async def test_a_failure_path_that_raises_still_frees_the_file_and_settles(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """When deciding a retry raises, the .part file and its lock are released and the lease
    settled; the next attempt on the same asset, in the same process, stores it."""
    body = payload(50_000)
    url = media.add("/crash.mp4", body, [Cut(20_000), Serve()])
    await queue(ledger, "tcrash", [url])
    broken = dataclasses.replace(pool(settings, ledger), retry=BrokenRetry(max_delay=0.05))

    await attempt(broken)

    crashed = await asset(ledger, "tcrash")
    assert (crashed.state, crashed.attempts) == (AssetState.pending, 1)
    assert crashed.error is not None and "OverflowError" in crashed.error
    assert files(task_dir(settings, "tcrash")) == [".0.part", ".0.part.json"]
    await attempt(pool(settings, ledger))

    stored = await asset(ledger, "tcrash")
    assert (stored.state, stored.sha256, stored.error) == (AssetState.stored, sha(body), None)
    assert media.hits("/crash.mp4")[1].headers["Range"] == "bytes=20000-"


PAGE = b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>\n"


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        ("text/html", "the server sent text/html, not a video"),
        ("application/octet-stream", "the body is not a video: it starts like HTML"),
    ],
)
async def test_a_web_page_is_never_stored_as_the_video(
    settings: Settings, ledger: Ledger, media: MediaServer, content_type: str, reason: str
) -> None:
    """A 200 with an error page is retried while the horizon lasts, then fails with the
    reason; no file (nor part of one) is left."""
    url = media.add("/page.mp4", PAGE, [Serve(content_type=content_type)])
    await queue(ledger, "tpage", [url])
    downloader = pool(settings, ledger, download_retry_hours=0.5 / 3600)

    await attempt(downloader)
    retried = await asset(ledger, "tpage")
    assert (retried.state, retried.error) == (AssetState.pending, f"{reason} (will try again)")
    assert files(task_dir(settings, "tpage")) == []
    await asyncio.sleep(0.6)  # past the half-second horizon
    await attempt(downloader)

    failed = await asset(ledger, "tpage")
    assert (failed.state, failed.error, failed.location) == (AssetState.failed, reason, None)
    assert files(task_dir(settings, "tpage")) == []


async def test_an_image_asset_holding_audio_is_refused(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """The kind checked is the asset's: an MP3 where an image is due is not stored."""
    url = media.add("/i.png", payload(3000, "mp3"), [Serve(content_type="image/png")])
    await queue(ledger, "tkind", [url], action=IMAGES)

    await attempt(pool(settings, ledger))

    refused = await asset(ledger, "tkind")
    assert refused.state is AssetState.pending
    assert refused.error is not None
    assert refused.error.startswith("the body is not an image: it starts like an MP3 file")


async def test_a_gzipped_video_is_stored_decoded(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """A server forcing gzip: the file, its sha256, size and sidecar are the video's own."""
    body = payload(100_000) + bytes(100_000)
    url = media.add("/gz.mp4", body, [Serve(encoding="gzip")])
    await queue(ledger, "tgz", [url])

    await attempt(pool(settings, ledger))

    stored = await asset(ledger, "tgz")
    assert (stored.state, stored.sha256, stored.size) == (AssetState.stored, sha(body), len(body))
    assert content(stored.location) == body
    assert (sidecar_of(stored.location)["sha256"], sidecar_of(stored.location)["size"]) == (
        sha(body),
        len(body),
    )


async def test_the_rate_settings_cut_a_trickle(
    settings: Settings, ledger: Ledger, media: MediaServer
) -> None:
    """DOWNLOAD_MIN_RATE and DOWNLOAD_RATE_WINDOW reach the download: a trickle is cut."""
    url = media.add("/drip.mp4", payload(400), [Trickle(every=0.05)])
    await queue(ledger, "tdrip", [url])
    downloader = pool(settings, ledger, download_min_rate=1000, download_rate_window=0.5)

    started = time.monotonic()
    await attempt(downloader)

    assert time.monotonic() - started < 3
    cut = await asset(ledger, "tdrip")
    assert cut.state is AssetState.pending
    assert cut.error is not None and cut.error.startswith("too slow: ")
