"""End to end: submit through the real service to a fake Kling, then callbacks, polls or both.

The service runs as its own process with KLING_API_BASE pointing at the fake Kling
(`http://127.0.0.1:PORT/kling`, so the path prefix is exercised), downloads from the
loopback media server on, and every poll timing shrunk to fractions of a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.database import open_ledger
from tests.fake_kling import FakeKling, result
from tests.media_server import MediaServer
from tests.support import Service, fixture_json, kling_env, wait_for

pytestmark = pytest.mark.e2e

T2V = "videos/text2video"
IMAGES = "images/generations"
PARAMS = {"prompt": "a lighthouse in a storm", "duration": "5", "mode": "std"}


@pytest.fixture
def spawn(services: Callable[..., Service], kling: FakeKling) -> Callable[..., Service]:
    """Start a service that submits to and polls the fake Kling; killed at the end of the test."""
    defaults = kling_env(kling.base_url) | {
        "DOWNLOAD_CONCURRENCY": "2",
        "POLL_AFTER": "1",
        "SUBMIT_RECONCILE_AFTER": "1",
    }
    return lambda **env: services(env=defaults | env)


def stats(service: Service) -> dict[str, Any]:
    response = httpx.get(service.base_url + "/api/stats", headers=service.admin, trust_env=False)
    assert response.status_code == 200, response.text
    counters: dict[str, Any] = response.json()
    return counters


def assert_stored(service: Service, kling: FakeKling, media: MediaServer, task_id: str) -> None:
    """Every file Kling's API names is stored with its bytes, fetched exactly once."""
    found = service.task(task_id)
    urls = kling.task(task_id).urls
    assert urls and [a["url"] for a in found["assets"]] == urls
    for asset in found["assets"]:
        body = kling.files[asset["url"]]
        assert asset["state"] == "stored"
        assert asset["sha256"] == hashlib.sha256(body).hexdigest()
        assert Path(asset["location"]).read_bytes() == body
        assert len(media.hits(httpx.URL(asset["url"]).path)) == 1


@pytest.mark.parametrize("verify", ["true", "false"])
def test_callbacks_take_a_submitted_task_to_archived_without_a_poll(
    spawn: Callable[..., Service], kling: FakeKling, media: MediaServer, verify: str
) -> None:
    """Submitted, processing and succeed callbacks: archived, no poll; a check only if verifying."""
    service = spawn(VERIFY_CALLBACKS=verify)
    task_id = service.submit(T2V, PARAMS)

    kling.advance(task_id)
    assert kling.send_callback(task_id) == 200
    kling.advance(task_id, files=2)
    assert kling.send_callback(task_id) == 200
    wait_for(service.archived(task_id), "the task to be archived")

    assert_stored(service, kling, media, task_id)
    found = service.task(task_id)
    assert (found["status"], found["learned_from"], found["flag"]) == ("succeed", "callback", None)
    verifications = 1 if verify == "true" else 0
    assert stats(service)["ledger"] == {
        "polls": 0,
        "verifications": verifications,
        "recovered_by_polling": 0,
        "recovered_by_sweep": 0,
        "flagged": 0,
    }
    assert found["polls"] == 0
    # The only query Kling saw is the succeed's confirmation, and only when verifying.
    assert len(kling.queries()) == len(kling.queries(task_id)) == verifications


def test_without_callbacks_polling_finds_the_end_and_the_task_is_archived(
    spawn: Callable[..., Service], kling: FakeKling, media: MediaServer
) -> None:
    """No callback at all: quiet for POLL_AFTER, the task is polled until it ends, then archived."""
    service = spawn()
    task_id = service.submit(IMAGES, {"prompt": "three cats"})

    kling.advance(task_id)
    wait_for(lambda: service.task(task_id)["status"] == "processing", "a poll to see processing")
    kling.advance(task_id, files=3)
    wait_for(service.archived(task_id), "the task to be archived")

    assert_stored(service, kling, media, task_id)
    found = service.task(task_id)
    assert (found["learned_from"], found["flag"]) == ("poll", None)
    assert found["polls"] >= 2
    ledger = stats(service)["ledger"]
    assert ledger["recovered_by_polling"] == 1 and ledger["verifications"] == 0
    assert ledger["polls"] == found["polls"] == len(kling.queries(task_id))


def test_callbacks_for_the_end_alone_are_enough(
    spawn: Callable[..., Service], kling: FakeKling, media: MediaServer
) -> None:
    """Only terminal callbacks: a succeed is archived and a failure recorded with its message."""
    service = spawn()
    done, broken = service.submit(T2V, PARAMS), service.submit(T2V, PARAMS)

    kling.advance(done, "processing")
    kling.advance(done, "succeed")
    assert kling.send_callback(done) == 200
    kling.advance(broken, "failed", msg="Failure to pass the risk control system")
    assert kling.send_callback(broken) == 200
    wait_for(service.archived(done), "the succeeded task to be archived")

    assert_stored(service, kling, media, done)
    assert service.task(done)["learned_from"] == "callback"
    failed = service.task(broken)
    assert (failed["status"], failed["learned_from"]) == ("failed", "callback")
    assert failed["status_msg"] == "Failure to pass the risk control system"
    assert failed["assets"] == [] and not failed["archived"]


def test_duplicated_callbacks_download_each_file_once(
    spawn: Callable[..., Service], kling: FakeKling, media: MediaServer
) -> None:
    """The succeed three times and a late processing: one confirmation, one fetch per file."""
    service = spawn(POLL_AFTER="60")  # a confirmation put off by the duplicates would time out
    task_id = service.submit(T2V, PARAMS)
    kling.advance(task_id)
    processing = kling.task(task_id).as_json()
    kling.advance(task_id, files=2)

    codes = [kling.send_callback(task_id) for _ in range(3)]
    codes.append(kling.send_callback(task_id, processing))
    wait_for(service.archived(task_id), "the task to be archived")

    assert codes == [200] * 4
    assert_stored(service, kling, media, task_id)
    assert len(kling.queries(task_id)) == 1
    assert stats(service)["deliveries"]["duplicate"] == 2


def test_a_forged_succeed_gives_way_to_the_apis_files_and_flags_the_task(
    spawn: Callable[..., Service], kling: FakeKling, media: MediaServer
) -> None:
    """A succeed through the task's own URL naming other files: Kling's API's files are stored."""
    service = spawn()
    task_id = service.submit(T2V, PARAMS)
    real = kling.advance(task_id, "succeed")
    planted = kling.add_file("/planted/0")
    forged = real.as_json() | {"task_result": result(task_id, T2V, [planted])}

    assert kling.send_callback(task_id, forged) == 200
    wait_for(service.archived(task_id), "the task to be archived")

    assert_stored(service, kling, media, task_id)
    found = service.task(task_id)
    assert found["flag"] is not None and "other files" in found["flag"]
    assert media.hits("/planted/0.mp4") == []
    assert stats(service)["ledger"]["flagged"] == 1


def test_a_forged_succeed_while_kling_says_processing_is_not_believed(
    spawn: Callable[..., Service], kling: FakeKling, media: MediaServer
) -> None:
    """Kling's API says processing: no assets, not succeed, flagged; the real end still archives."""
    service = spawn()
    task_id = service.submit(T2V, PARAMS)
    kling.advance(task_id)
    planted = kling.add_file("/planted/1")
    forged = kling.task(task_id).as_json() | {
        "task_status": "succeed",
        "task_result": result(task_id, T2V, [planted]),
    }

    assert kling.send_callback(task_id, forged) == 200
    wait_for(lambda: service.task(task_id)["flag"] is not None, "the forged succeed to be checked")

    found = service.task(task_id)
    assert found["status"] == "processing" and found["assets"] == []
    assert "processing" in found["flag"]
    kling.advance(task_id, "succeed")
    assert kling.send_callback(task_id) == 200
    wait_for(service.archived(task_id), "the real succeed to be archived")
    assert_stored(service, kling, media, task_id)
    assert media.hits("/planted/1.mp4") == []


def test_a_succeed_through_a_url_without_an_action_is_archived_though_it_cannot_be_checked(
    spawn: Callable[..., Service], kling: FakeKling, media: MediaServer
) -> None:
    """With credentials set, a hand-made URL that names no action still gets its files stored."""
    service = spawn()
    url = kling.add_file("/hand-made/0")
    body = fixture_json("callback_text2video_succeed.json")
    body["task_result"] = result(body["task_id"], T2V, [url])

    delivered = httpx.post(service.callback_url(), json=body, trust_env=False)
    assert delivered.json()["outcome"] == "moved"
    wait_for(service.archived(body["task_id"]), "the task to be archived")

    (asset,) = service.task(body["task_id"])["assets"]
    assert Path(asset["location"]).read_bytes() == kling.files[url]
    assert kling.requests == []


def test_tasks_in_flight_when_the_service_is_killed_are_archived_after_restart(
    spawn: Callable[..., Service], kling: FakeKling, media: MediaServer
) -> None:
    """SIGKILL, callbacks sent to the dead port are lost: the start-up check finds every end."""
    service = spawn(POLL_AFTER="60")  # only the check at start-up can find them in time
    task_ids = [service.submit(T2V, PARAMS) for _ in range(3)]
    kling.advance(task_ids[0])
    assert kling.send_callback(task_ids[0]) == 200

    service.stop(signal.SIGKILL)
    for task_id in task_ids:
        kling.advance(task_id, "succeed")
        assert kling.send_callback(task_id) is None  # nobody listening
    service.start()

    for task_id in task_ids:
        wait_for(service.archived(task_id), f"task {task_id} to be archived")
        assert_stored(service, kling, media, task_id)
        assert service.task(task_id)["learned_from"] == "poll"
    assert stats(service)["ledger"]["recovered_by_polling"] == 3


def test_submissions_left_without_an_answer_are_reconciled_by_the_running_service(
    spawn: Callable[..., Service], kling: FakeKling
) -> None:
    """Recorded but never answered: one Kling knows becomes a task, the other is marked lost."""
    service = spawn()
    known = kling.add_task(T2V, external_task_id="kr-crashed-known", status="processing")

    async def record() -> None:
        async with open_ledger(f"sqlite:///{service.data_dir}/kling-receiver.db") as ledger:
            for ext in ("kr-crashed-known", "kr-crashed-unknown"):
                await ledger.record_submission(T2V, PARAMS, ext, None)

    asyncio.run(record())
    wait_for(lambda: len(kling.queries()) >= 2, "both submissions to be looked up")
    wait_for(
        lambda: task_listing(service) == [known.task_id], "the known submission to become a task"
    )

    found = service.task(known.task_id)
    assert (found["status"], found["external_task_id"]) == ("processing", "kr-crashed-known")

    async def states() -> list[str | None]:
        async with open_ledger(f"sqlite:///{service.data_dir}/kling-receiver.db") as ledger:
            subs = [await ledger.submission(e) for e in ("kr-crashed-known", "kr-crashed-unknown")]
            return [s.state if s else None for s in subs]

    wait_for(lambda: asyncio.run(states()) == ["accepted", "lost"], "the unknown one to be lost")


def task_listing(service: Service, **params: str) -> list[str]:
    response = httpx.get(
        service.base_url + "/api/tasks", params=params, headers=service.admin, trust_env=False
    )
    return [t["task_id"] for t in response.json()["tasks"]]


def test_the_cli_submits_tracks_and_reports_tasks(
    spawn: Callable[..., Service], kling: FakeKling, media: MediaServer
) -> None:
    """`submit` prints the task; `track` adopts one polled to archived; `status`/`tasks` report."""
    service = spawn()
    sent = service.cli("submit", T2V, "--param", "prompt=a fox", "--param", "duration=5")
    assert sent.returncode == 0, sent.stderr
    submitted = json.loads(sent.stdout)
    (create,) = kling.creates()
    assert create.body["duration"] == "5" and create.body["prompt"] == "a fox"
    assert create.body["callback_url"].startswith(service.base_url + "/callbacks/kling/x-kr-")
    assert submitted["task_id"] == kling.by_external(create.body["external_task_id"]).task_id
    assert submitted["status"] == "submitted"

    elsewhere = kling.add_task(T2V, status="processing")
    tracked = service.cli("track", T2V, elsewhere.task_id)
    assert tracked.returncode == 0, tracked.stderr
    assert tracked.stdout.startswith(f"now tracking {elsewhere.task_id}")
    assert "processing" in tracked.stdout
    kling.advance(elsewhere.task_id, "succeed")
    wait_for(service.archived(elsewhere.task_id), "the tracked task to be archived by polling")
    assert_stored(service, kling, media, elsewhere.task_id)

    status = service.cli("status", elsewhere.task_id)
    assert status.returncode == 0, status.stderr
    first_line = status.stdout.splitlines()[0]
    assert elsewhere.task_id in first_line and "succeed, learned by poll" in first_line
    assert "(archived)" in first_line
    as_json = json.loads(service.cli("status", elsewhere.task_id, "--json").stdout)
    assert as_json == service.task(elsewhere.task_id)

    listing = service.cli("tasks", "--status", "succeed")
    assert listing.returncode == 0, listing.stderr
    (line,) = listing.stdout.splitlines()
    assert line.startswith(elsewhere.task_id) and T2V in line
    listed = json.loads(service.cli("tasks", "--json").stdout)
    assert [t["task_id"] for t in listed["tasks"]] == [elsewhere.task_id, submitted["task_id"]]

    missing = service.cli("status", "867000000000000999")
    assert missing.returncode == 1 and "no task" in missing.stderr


def test_polling_gives_up_on_a_task_that_never_ends_and_says_why(
    spawn: Callable[..., Service], kling: FakeKling
) -> None:
    """Past POLL_GIVE_UP_HOURS the task is no longer queried, and status_msg tells what to do."""
    service = spawn(POLL_GIVE_UP_HOURS="0.0003")  # about a second
    task_id = service.submit(T2V, PARAMS)
    kling.advance(task_id)

    def gave_up() -> bool:
        return "polling stopped" in (service.task(task_id)["status_msg"] or "")

    wait_for(gave_up, "polling to stop")
    queried = len(kling.queries(task_id))
    time.sleep(0.6)  # several POLL_INTERVALs

    assert len(kling.queries(task_id)) == queried
    found = service.task(task_id)
    assert found["status"] in ("submitted", "processing") and not found["archived"]
    assert "track" in found["status_msg"]
