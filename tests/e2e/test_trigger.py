"""`kling-receiver trigger` against the real service: sample callbacks in both standards,
for the sample files the service serves itself, followed until archived."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from receiver.samples import sample_bytes
from receiver.shapes import parse_task
from receiver.trigger import File, callback_body
from tests.support import Service

pytestmark = pytest.mark.e2e

SIGNING = "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI="


def sample(name: str) -> bytes:
    found = sample_bytes(name)
    assert found is not None
    return found[0]


@pytest.mark.parametrize(
    ("body_format", "kinds", "stored"),
    [
        ("old", "video,image", {"sample.mp4", "sample.png"}),
        ("new", "video,image,audio", {"sample.mp4", "sample.png", "sample.mp3", "sample.wav"}),
    ],
)
def test_a_sample_success_ends_archived_with_the_sample_files(
    services: Callable[..., Service], body_format: str, kinds: str, stored: set[str]
) -> None:
    """Against a service on its defaults (private addresses refused), the command exits 0
    once the task is archived; every file stored is a sample, byte for byte, fetched from
    the service's own /samples/; the body was signed (the service verifies, same key)."""
    service = services(env={"KLING_WEBHOOK_SECRET": SIGNING, "DOWNLOAD_CONCURRENCY": "2"})
    done = service.cli("trigger", "succeed", "--with", kinds, "--format", body_format, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = done.stdout.split("for task ")[1].split(":")[0]
    assert f"task {task_id} archived: {len(stored)} files stored" in done.stdout
    task = httpx.get(f"{service.base_url}/api/tasks/{task_id}", headers=service.admin).json()
    assert task["archived"] and len(task["assets"]) == len(stored)
    by_bytes = {sample(name): name for name in stored}
    assert {by_bytes[Path(a["location"]).read_bytes()] for a in task["assets"]} == stored
    (delivery,) = httpx.get(
        f"{service.base_url}/api/tasks/{task_id}/events", headers=service.admin
    ).json()["events"]
    assert delivery["headers"].get("webhook-signature", "").startswith("v1,")


def test_a_series_of_statuses_moves_one_task(services: Callable[..., Service]) -> None:
    """--task-id sends later statuses for the same task, through its own callback URL."""
    service = services()
    task_id = "123456789012345678"
    for status in ("submitted", "processing", "failed"):
        done = service.cli("trigger", status, "--task-id", task_id)
        assert done.returncode == 0, done.stdout + done.stderr
    task = httpx.get(f"{service.base_url}/api/tasks/{task_id}", headers=service.admin).json()
    assert task["status"] == "failed" and task["updates"] == 3
    assert task["status_msg"].startswith("Sample failure")


def test_files_the_service_refuses_are_explained(services: Callable[..., Service]) -> None:
    """A --url on a private address is refused by the service's download policy: the
    command says the files could not be stored and why, rather than waiting out its time."""
    service = services(env={"DOWNLOAD_CONCURRENCY": "2"})
    private = "http://10.1.2.3/clip.mp4"
    done = service.cli("trigger", "succeed", "--url", private, "--wait", "60", timeout=90)
    assert done.returncode == 1
    assert "could not store the files" in done.stderr and "not a public address" in done.stderr


def test_the_samples_are_served_to_anyone(services: Callable[..., Service]) -> None:
    service = services()
    answer = httpx.get(f"{service.base_url}/samples/sample.png", trust_env=False)
    assert answer.status_code == 200 and answer.content == sample("sample.png")
    assert answer.headers["content-type"] == "image/png"
    missing = httpx.get(f"{service.base_url}/samples/secrets.json", trust_env=False)
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "args",
    [
        ("succeed", "--format", "old", "--with", "audio"),
        ("succeed", "--with", "video,hologram"),
        ("maybe",),
    ],
)
def test_a_request_that_cannot_be_made_is_refused(
    services: Callable[..., Service], args: tuple[str, ...]
) -> None:
    service = services()
    done = service.cli("trigger", *args)
    assert done.returncode in (1, 2) and done.stderr.strip()
    assert "sent" not in done.stdout


@pytest.mark.parametrize("body_format", ["old", "new"])
def test_sample_bodies_read_as_the_files_they_name(body_format: str) -> None:
    """What the command sends parses as Kling's own bodies do, every file found."""
    files = [File("video", "http://h/v.mp4"), File("image", "http://h/i.png")]
    if body_format == "new":
        files += [File("audio", "http://h/a.mp3"), File("audio", "http://h/a.wav")]
    status = "succeed" if body_format == "old" else "succeeded"
    body = callback_body(body_format, status, "42", "trigger-42", files)
    task = parse_task(json.loads(json.dumps(body)))
    assert task.task_id == "42" and task.external_task_id == "trigger-42"
    assert sorted(spec.url for spec in task.files) == sorted(f.url for f in files)
