"""End to end with Kling's current API standard: model-path creates, TASK2 callbacks with every
output type, batch queries, and the account sweep, through the real service process.

The service talks to the fake Kling over loopback (`tests/fake_kling.py`), which signs its
callbacks per Standard Webhooks when it has a secret, and serves result files from the
media server.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_kling import CONSOLE_TEST_ID, MAX_BATCH, FakeKling, now_ms
from tests.media_server import MediaServer
from tests.support import Service, json_lines, kling_env, wait_for

pytestmark = pytest.mark.e2e

T2V = "text-to-video/kling-2.6"
PARAMS = {"prompt": "a lighthouse in a storm", "settings": {"duration": 5}}
SECRET = "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI="
DAY_MS = 86_400_000


@pytest.fixture
def spawn(services: Callable[..., Service], kling: FakeKling) -> Callable[..., Service]:
    """A service that submits to, polls and sweeps the fake Kling, downloading from loopback."""
    defaults = kling_env(kling.base_url) | {
        "DOWNLOAD_CONCURRENCY": "4",
        "POLL_AFTER": "3600",
        "SWEEP_INTERVAL": "0",
    }
    return lambda **env: services(env=defaults | env)


def listed(service: Service, **filters: str) -> list[dict[str, Any]]:
    """Up to 200 of the service's tasks, filtered as `GET /api/tasks` filters."""
    response = service.api("/api/tasks", limit="200", **filters)
    assert response.status_code == 200, response.text
    tasks: list[dict[str, Any]] = response.json()["tasks"]
    return tasks


def stored_files(service: Service, kling: FakeKling, task_id: str) -> list[str]:
    """The names of the task's stored files, each checked against the bytes Kling served."""
    names = []
    for asset in service.task(task_id)["assets"]:
        body = kling.files[asset["url"]]
        assert asset["state"] == "stored", asset
        assert asset["sha256"] == hashlib.sha256(body).hexdigest()
        location = Path(asset["location"])
        assert location.read_bytes() == body
        names.append(location.name)
    return sorted(names)


@pytest.mark.parametrize("signed", [True, False])
def test_the_consoles_test_callback_is_answered_200_and_recorded(
    services: Callable[..., Service], kling: FakeKling, signed: bool
) -> None:
    """Kling's "send test callback" button: signed when the account has a webhook secret."""
    service = services(env={"KLING_WEBHOOK_SECRET": SECRET} if signed else {})
    kling.webhook_secret = SECRET if signed else None

    assert kling.console_test(service.callback_url()) == 200

    task = service.task(CONSOLE_TEST_ID)
    assert task["status"] == "submitted"
    events = service.api(f"/api/tasks/{CONSOLE_TEST_ID}/events").json()["events"]
    assert [(e["source"], e["shape"]) for e in events] == [("callback", "new")]
    assert ("webhook-signature" in events[0]["headers"]) is signed


def test_a_current_standard_task_is_submitted_called_back_and_every_output_stored(
    spawn: Callable[..., Service], kling: FakeKling, media: MediaServer
) -> None:
    """A video, two grouped images and an audio output: five files, sha256 checked, archived."""
    kling.webhook_secret = SECRET
    service = spawn(KLING_WEBHOOK_SECRET=SECRET)
    task_id = service.submit(T2V, PARAMS)

    (create,) = kling.creates()
    assert create.path == "/kling/" + T2V
    options = create.body["options"]
    assert options["callback_url"].startswith(service.base_url + "/callbacks/kling/x-kr-")
    assert options["callback_url"].endswith("/" + T2V)
    assert options["external_task_id"] == service.task(task_id)["external_task_id"]
    assert "callback_url" not in create.body and create.body["settings"] == {"duration": 5}

    kling.advance(task_id)
    assert kling.send_callback(task_id) == 200
    kling.advance(task_id, outputs=["video", "image", "image", "audio", "element"])
    assert kling.send_callback(task_id) == 200
    wait_for(service.archived(task_id), "the task to be archived")

    assert stored_files(service, kling, task_id) == [
        "audio-0-mp3.mp3",
        "audio-0-wav.wav",
        "image-0.png",
        "image-1.png",
        "video-0.mp4",
    ]
    task = service.task(task_id)
    assert task["learned_from"] == "callback"
    images = [a for a in task["assets"] if a["kind"] == "image"]
    assert [a["group_id"] for a in images] == ["g1", "g1"]
    # The succeed callback was confirmed through the batch query, not a per-task path.
    assert [q.query for q in kling.batch_queries()] == [{"task_ids": task_id}]
    for asset in task["assets"]:
        assert len(media.hits(httpx.URL(asset["url"]).path)) == 1


def test_watermarked_copies_are_archived_only_when_asked(
    spawn: Callable[..., Service], kling: FakeKling
) -> None:
    service = spawn(ARCHIVE_WATERMARKED="true", VERIFY_CALLBACKS="false")
    task_id = service.submit(T2V, PARAMS)
    kling.advance(task_id, "succeed", outputs=["video", "image"], watermarked=True)
    assert kling.send_callback(task_id) == 200
    wait_for(service.archived(task_id), "the task to be archived")
    assert stored_files(service, kling, task_id) == [
        "image-0-watermarked.png",
        "image-0.png",
        "video-0-watermarked.mp4",
        "video-0.mp4",
    ]


def test_quiet_current_standard_tasks_are_polled_fifty_to_a_request(
    spawn: Callable[..., Service], kling: FakeKling
) -> None:
    """200 tasks whose callbacks never come: one poll round costs at most 10 requests."""
    service = spawn(DOWNLOAD_CONCURRENCY="8")
    with ThreadPoolExecutor(8) as pool:
        task_ids = list(pool.map(lambda _: service.submit(T2V, PARAMS), range(200)))
    service.stop()
    for task_id in task_ids:
        kling.advance(task_id, "succeed")

    # A restart queries every unfinished task at once: one round over all 200.
    service.extra_env["POLL_AFTER"] = "1"
    service.start()
    wait_for(lambda: len(listed(service, status="succeed")) == 200, "all 200 found", timeout=60)
    batches = kling.batch_queries()
    assert len(batches) <= 10, [len(b.query["task_ids"].split(",")) for b in batches]
    named = [b.query["task_ids"].split(",") for b in batches]
    assert all(len(ids) <= MAX_BATCH for ids in named)
    assert sorted(id_ for ids in named for id_ in ids) == sorted(task_ids)
    assert len(batches) == math.ceil(200 / MAX_BATCH)
    assert not [r for r in kling.queries() if r.path.startswith("/kling/v1/")]
    wait_for(lambda: len(listed(service, archived="true")) == 200, "all archived", timeout=120)
    assert {task["learned_from"] for task in listed(service)} == {"poll"}


def test_a_lost_submission_answer_is_reconciled_by_external_id(
    spawn: Callable[..., Service], kling: FakeKling
) -> None:
    """Kling created the task but its answer never came: found through external_task_ids."""
    service = spawn(SUBMIT_RECONCILE_AFTER="1", POLL_AFTER="1")
    kling.fail_creates(5000, 5000, 5000, 5000, 5000)  # Kling's trouble: maybe created
    response = httpx.post(
        service.base_url + "/api/tasks",
        json={"action": T2V, "params": PARAMS},
        headers=service.admin,
        trust_env=False,
    )
    assert response.status_code == 504, response.text
    external = response.json()["message"].split("submission ")[1].split(" ")[0]
    made = kling.add_task(T2V, external_task_id=external)
    kling.advance(made.task_id, "succeed")
    wait_for(service.archived(made.task_id), "the reconciled task to be archived", timeout=30)
    assert any("external_task_ids" in q.query for q in kling.batch_queries())


def sweeps(service: Service) -> list[dict[str, Any]]:
    return [e for e in json_lines(service.log()) if e.get("message") == "sweep"]


def test_the_sweep_adopts_a_task_only_the_listing_knows(
    spawn: Callable[..., Service], kling: FakeKling
) -> None:
    """Made by another tool, its callback never here: archived by the sweep, once."""
    service = spawn(SWEEP_INTERVAL="0.5")
    before_first_start = kling.add_task(T2V, created_at=now_ms() - 3 * DAY_MS)
    kling.advance(before_first_start.task_id, "succeed")
    time.sleep(1)  # the first pass only marks where sweeping begins
    elsewhere = kling.add_task(T2V)
    kling.advance(elsewhere.task_id, "succeed", outputs=["video", "audio"])

    wait_for(service.archived(elsewhere.task_id), "the swept task to be archived", timeout=30)
    task = service.task(elsewhere.task_id)
    assert task["learned_from"] == "sweep"
    assert len(task["assets"]) == 3
    adopting = len(sweeps(service))
    wait_for(lambda: len(sweeps(service)) >= adopting + 2, "two more sweeps")
    adopted = [entry["adopted"] for entry in sweeps(service)]
    assert sorted(adopted)[-2:] == [0, 1] and sum(adopted) == 1, adopted
    assert adopted.index(1) < len(adopted) - 2  # and the sweeps after it adopted nothing
    # Older than the first start: left to an explicit backfill.
    assert service.api(f"/api/tasks/{before_first_start.task_id}").status_code == 404

    bodies = [r.body for r in kling.listings()]
    assert all(b["filters"] == [{"key": "status", "values": ["succeeded"]}] for b in bodies)
    for earlier, later in itertools.pairwise(bodies):
        assert later["start_time"] <= earlier["end_time"]  # windows overlap, never gap

    # The window is durable: after a restart, sweeping goes on from where it ended.
    last_end = bodies[-1]["end_time"]
    service.restart()
    wait_for(lambda: len(kling.listings()) > len(bodies), "a sweep after the restart")
    resumed = kling.listings()[len(bodies)].body
    assert last_end - 7 * 3_600_000 < resumed["start_time"] <= last_end


def test_sweep_command_backfills_with_a_summary(
    spawn: Callable[..., Service], kling: FakeKling
) -> None:
    """`kling-receiver sweep --since 30d` adopts older tasks; run again, it adopts nothing."""
    service = spawn()
    old = [kling.add_task(T2V, created_at=now_ms() - days * DAY_MS) for days in (2, 10, 29)]
    for task in old:
        kling.advance(task.task_id, "succeed")
    kling.add_task(T2V, created_at=now_ms() - 40 * DAY_MS)  # outside the window
    kling.add_task(T2V)  # not succeeded: not listed

    first = service.cli("sweep", "--since", "30d")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "3 tasks seen, 3 adopted, 0 already known"
    assert "3/3 tasks swept" in first.stderr
    for task in old:
        wait_for(service.archived(task.task_id), "a backfilled task to be archived")

    again = service.cli("sweep", "--since", "30d")
    assert again.stdout.strip() == "3 tasks seen, 0 adopted, 3 already known"

    bad = service.cli("sweep", "--since", "a month")
    assert bad.returncode == 2 and "whole number and d, h or m" in bad.stderr
