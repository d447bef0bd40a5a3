"""End-to-end: the real `python -m receiver serve` process, driven over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from receiver import tokens
from tests.pg_server import PostgresServer
from tests.support import (
    ADMIN_TOKEN,
    CALLBACK_SECRET,
    Service,
    fixture_bytes,
    fixture_json,
    post_all,
)

pytestmark = pytest.mark.e2e

TEXT2VIDEO = "videos/text2video"
JSON = {"content-type": "application/json"}

# Every sample callback, with the action it belongs to and the task it names.
SAMPLES = [
    ("callback_text2video_submitted.json", TEXT2VIDEO),
    ("callback_text2video_processing.json", TEXT2VIDEO),
    ("callback_text2video_succeed.json", TEXT2VIDEO),
    ("callback_text2video_failed.json", TEXT2VIDEO),
    ("callback_images_generations_succeed.json", "images/generations"),
    ("callback_images_aggregator_variant.json", "images/generations"),
    ("callback_video_extend_succeed.json", "videos/video-extend"),
    ("callback_virtual_try_on_succeed.json", "images/kolors-virtual-try-on"),
    ("callback_future_fields.json", "videos/image2video"),
]


@pytest.fixture
def spawn(services: Callable[..., Service]) -> Callable[..., Service]:
    """Start services on demand; each is killed at the end of the test if still running."""
    return services


def body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def url_for(service: Service, payload: dict[str, Any], action: str | None) -> str:
    """The URL the service would have given out for this task: its own, or a shared one."""
    external = (payload.get("task_info") or {}).get("external_task_id")
    return service.callback_url(tokens.task_ref(external) if external else None, action)


def signature(url: str) -> str:
    """The HMAC segment of a callback URL (the one after the reference)."""
    parts = urlsplit(url).path.split("/")
    return parts[parts.index("kling") + 2]


def expected_assets(payload: dict[str, Any]) -> list[tuple[str, int, str]]:
    result = payload.get("task_result") or {}
    videos = [("video", n, video["url"]) for n, video in enumerate(result.get("videos") or [])]
    images = [
        ("image", image.get("index", n), image["url"])
        for n, image in enumerate(result.get("images") or [])
    ]
    return videos + images


def snapshot(service: Service) -> dict[str, dict[str, Any]]:
    """Every task the read API knows, each with its events, fetched concurrently."""

    async def run() -> dict[str, dict[str, Any]]:
        async with httpx.AsyncClient(
            base_url=service.base_url, headers=service.admin, timeout=30, trust_env=False
        ) as client:
            tasks: list[dict[str, Any]] = []
            cursor = ""
            while True:
                page = await client.get("/api/tasks", params={"limit": 200, "cursor": cursor})
                assert page.status_code == 200, page.text
                tasks += page.json()["tasks"]
                cursor = page.json()["next_cursor"]
                if not cursor:
                    break
            gate = asyncio.Semaphore(32)

            async def events(task_id: str) -> list[dict[str, Any]]:
                async with gate:
                    response = await client.get(f"/api/tasks/{task_id}/events")
                assert response.status_code == 200, response.text
                found: list[dict[str, Any]] = response.json()["events"]
                return found

            found = await asyncio.gather(*(events(task["task_id"]) for task in tasks))
            return {
                task["task_id"]: task | {"events": task_events}
                for task, task_events in zip(tasks, found, strict=True)
            }

    return asyncio.run(run())


def test_shuffled_duplicated_concurrent_deliveries_end_in_the_final_state(
    service: Service,
) -> None:
    """Shuffled, triplicated, concurrent deliveries leave each task succeeded with its assets."""
    processing = fixture_json("callback_text2video_processing.json")
    later = processing | {"updated_at": processing["updated_at"] + 60_000, "task_status_msg": "50%"}
    succeed = fixture_json("callback_text2video_succeed.json")
    deliveries: list[tuple[str, bytes]] = []
    expected: dict[str, list[bytes]] = {}
    for n in range(3):  # three tasks, so several interleavings are tried at once
        task_id = f"86728374175911{n:04d}"
        external = f"kr_e2e_shuffle_{n}"
        distinct = []
        for name_or_payload in (
            "callback_text2video_submitted.json",
            "callback_text2video_processing.json",
            later,
            "callback_text2video_succeed.json",
        ):
            payload = (
                fixture_json(name_or_payload)
                if isinstance(name_or_payload, str)
                else dict(name_or_payload)
            )
            payload |= {"task_id": task_id, "task_info": {"external_task_id": external}}
            distinct.append(body(payload))
        expected[task_id] = distinct
        url = service.callback_url(tokens.task_ref(external), TEXT2VIDEO)
        deliveries += [(url, content) for content in distinct for _ in range(3)]
    random.Random(20251125).shuffle(deliveries)

    responses = post_all(deliveries)

    assert [r.status_code for r in responses] == [200] * len(deliveries)
    outcomes = Counter(r.json()["outcome"] for r in responses)
    assert outcomes["duplicate"] == 2 * 4 * 3
    assert outcomes["moved"] + outcomes["kept"] == 4 * 3
    video = succeed["task_result"]["videos"][0]
    for task_id, distinct in expected.items():
        task = service.api(f"/api/tasks/{task_id}").json()
        assert task["status"] == "succeed"
        assert task["kling_updated_at"] == succeed["updated_at"]
        assert task["updates"] == len(distinct)
        assert task["learned_from"] == "callback"
        assert task["action"] == TEXT2VIDEO
        assert [(a["kind"], a["index"], a["url"], a["state"]) for a in task["assets"]] == [
            ("video", 0, video["url"], "pending")
        ]
        events = service.api(f"/api/tasks/{task_id}/events").json()["events"]
        assert sorted(e["body"].encode() for e in events) == sorted(distinct)
        assert [e["times_received"] for e in events] == [3] * len(distinct)
        applied = {e["body"].encode(): e["applied"] for e in events}
        assert applied[distinct[-1]] is True  # the succeed delivery is the one in force


def test_forged_deliveries_are_refused_and_not_recorded(service: Service) -> None:
    """A badly signed URL gets 404, another task's valid URL 401, and neither is recorded."""
    genuine = fixture_bytes("callback_text2video_processing.json")
    own_url = service.callback_url(tokens.task_ref("kr_01JDX3N5Q8"), TEXT2VIDEO)
    assert httpx.post(own_url, content=genuine, headers=JSON).status_code == 200

    # What an attacker would like to record: a success pointing at their own file.
    forged = fixture_json("callback_text2video_succeed.json")
    forged["task_result"]["videos"][0]["url"] = "https://attacker.example/evil.mp4"
    without_info = {key: value for key, value in forged.items() if key != "task_info"}
    sig = signature(own_url)
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    other_task_url = service.callback_url(tokens.task_ref("kr_someone_else"), TEXT2VIDEO)
    attempts = [
        (own_url.replace(sig, flipped), body(forged), 404),
        (own_url.replace(sig, sig[:-1]), body(forged), 404),
        (own_url.replace(TEXT2VIDEO, "images/generations"), body(forged), 404),
        (other_task_url, body(forged), 401),
        (other_task_url, body(without_info), 401),
        (service.callback_url(None, TEXT2VIDEO), body(without_info), 401),
    ]
    codes = {404: "unknown_callback_url", 401: "wrong_task"}
    for url, content, status in attempts:
        response = httpx.post(url, content=content, headers=JSON)
        assert response.status_code == status, (url, response.text)
        assert response.json()["error"] == codes[status]

    events = service.api("/api/tasks/867283741759111202/events").json()["events"]
    assert [e["body"].encode() for e in events] == [genuine]
    assert events[0]["times_received"] == 1
    task = service.api("/api/tasks/867283741759111202").json()
    assert task["status"] == "processing"
    assert task["assets"] == []
    assert [t["task_id"] for t in service.api("/api/tasks").json()["tasks"]] == [
        "867283741759111202"
    ]


def test_a_shared_url_heard_first_does_not_lock_out_the_tasks_own_url(service: Service) -> None:
    """Whoever delivers a task first through an h- URL, its own x- URL is recorded and binds it."""
    forged = fixture_json("callback_text2video_failed.json")
    forged["task_id"] = "867283741759111202"
    shared_url = service.callback_url(None, TEXT2VIDEO)
    assert httpx.post(shared_url, content=body(forged), headers=JSON).status_code == 200

    own_url = service.callback_url(tokens.task_ref("kr_01JDX3N5Q8"), TEXT2VIDEO)
    for name in ("processing", "succeed"):
        genuine = fixture_bytes(f"callback_text2video_{name}.json")
        response = httpx.post(own_url, content=genuine, headers=JSON)
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "moved"
    refused = httpx.post(shared_url, content=body(forged), headers=JSON)
    assert refused.status_code == 401 and refused.json()["error"] == "wrong_task"

    task = service.task("867283741759111202")
    assert (task["status"], task["external_task_id"]) == ("succeed", "kr_01JDX3N5Q8")
    assert [asset["url"] for asset in task["assets"]] == [
        url for _, _, url in expected_assets(fixture_json("callback_text2video_succeed.json"))
    ]
    events = service.api("/api/tasks/867283741759111202/events").json()["events"]
    assert [event["status"] for event in events] == ["failed", "processing", "succeed"]


@pytest.fixture(params=["sqlite", "postgres"])
def any_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    """The service on each ledger backend: its SQLite file, or a new PostgreSQL database."""
    env = {}
    if request.param == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres").create_database()
    running = Service(tmp_path / "data", env)
    running.start()
    yield running
    if running.process is not None:
        running.process.kill()
        running.process.wait()


def test_everything_survives_sigkill_and_restart(any_service: Service) -> None:
    """Tasks, verbatim events and assets acknowledged before a SIGKILL are there after restart,
    on SQLite and on PostgreSQL."""
    service = any_service
    deliveries = []
    for name, action in SAMPLES:
        deliveries.append((url_for(service, fixture_json(name), action), fixture_bytes(name)))
    responses = post_all(deliveries)
    assert [r.status_code for r in responses] == [200] * len(deliveries)

    service.restart()  # SIGKILL straight after the last 200, then start again

    expected: dict[str, list[str]] = {}
    for name, _ in SAMPLES:
        expected.setdefault(fixture_json(name)["task_id"], []).append(name)
    tasks = snapshot(service)
    assert sorted(tasks) == sorted(expected)
    for task_id, names in expected.items():
        final = fixture_json(names[-1])  # the samples of a task are listed in status order
        task = tasks[task_id]
        assert task["status"] == final["task_status"]
        assert task["updates"] == len(names)
        assert sorted(e["body"] for e in task["events"]) == sorted(
            fixture_bytes(name).decode() for name in names
        )
        assert [(a["kind"], a["index"], a["url"]) for a in task["assets"]] == expected_assets(final)
        assert all(a["state"] == "pending" for a in task["assets"])
    assert sum(len(t["assets"]) for t in tasks.values()) == 7

    url, content = deliveries[0]
    again = httpx.post(url, content=content, headers=JSON).json()
    assert again["outcome"] == "duplicate"


def test_a_thousand_concurrent_deliveries_are_all_recorded_durably(any_service: Service) -> None:
    """1000 concurrent deliveries for 100 tasks all get 200 and survive a SIGKILL, on SQLite
    and on PostgreSQL."""
    service = any_service
    repeats = (2, 3, 2, 3)  # times each of a task's four distinct bodies is sent
    deliveries: list[tuple[str, bytes]] = []
    expected: dict[str, tuple[str, list[bytes], int]] = {}
    for n in range(100):
        task_id = f"9100000000{n:04d}"
        external = f"kr_load_{n:03d}"
        base = {
            "task_id": task_id,
            "task_status_msg": "",
            "created_at": 1764043200000,
            "task_info": {"external_task_id": external},
        }
        terminal: dict[str, Any] = (
            {
                "task_status": "succeed",
                "task_result": {
                    "videos": [
                        {
                            "id": f"{task_id}_0",
                            "url": f"https://cdn.klingai.com/{task_id}.mp4",
                            "duration": "5.1",
                        }
                    ]
                },
            }
            if n % 2 == 0
            else {"task_status": "failed", "task_status_msg": "risk control"}
        )
        distinct = [
            body(base | {"task_status": "submitted", "updated_at": 1764043200000}),
            body(base | {"task_status": "processing", "updated_at": 1764043201000}),
            body(base | {"task_status": "processing", "updated_at": 1764043202000}),
            body(base | {"updated_at": 1764043203000} | terminal),
        ]
        expected[task_id] = (terminal["task_status"], distinct, 1 if n % 2 == 0 else 0)
        url = service.callback_url(tokens.task_ref(external), TEXT2VIDEO)
        deliveries += [
            (url, content)
            for content, times in zip(distinct, repeats, strict=True)
            for _ in range(times)
        ]
    assert len(deliveries) == 1000
    random.Random(1000).shuffle(deliveries)

    responses = post_all(deliveries, concurrency=64)
    assert Counter(r.status_code for r in responses) == {200: 1000}

    def check(tasks: dict[str, dict[str, Any]]) -> None:
        assert sorted(tasks) == sorted(expected)
        for task_id, (status, distinct, assets) in expected.items():
            task = tasks[task_id]
            assert task["status"] == status, task_id
            assert task["updates"] == len(distinct)
            assert len(task["assets"]) == assets
            assert sorted(e["body"].encode() for e in task["events"]) == sorted(distinct)
            assert sorted(e["times_received"] for e in task["events"]) == sorted(repeats)

    before = snapshot(service)
    check(before)
    service.restart()
    after = snapshot(service)
    check(after)
    assert after == before


def test_an_oversized_body_is_refused_quickly_and_the_service_stays_healthy(
    service: Service,
) -> None:
    """A 5 MB delivery is answered 413 at once, and the service goes on working."""
    url = service.callback_url(None, TEXT2VIDEO)
    huge = b'{"task_id": "1", "task_status": "succeed", "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    started = time.monotonic()
    response = httpx.post(url, content=huge, headers=JSON, timeout=10)
    elapsed = time.monotonic() - started
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"
    assert elapsed < 2

    assert httpx.get(service.base_url + "/healthz").status_code == 200
    assert httpx.get(service.base_url + "/readyz").status_code == 200
    ok = httpx.post(url, content=fixture_bytes("callback_text2video_submitted.json"), headers=JSON)
    assert ok.status_code == 200
    assert [t["task_id"] for t in service.api("/api/tasks").json()["tasks"]] == [
        "867283741759111202"
    ]


def test_sigterm_lets_a_request_in_flight_finish_and_exits_zero(service: Service) -> None:
    """SIGTERM during a slow delivery still answers it 200, exits 0 and keeps it."""
    content = fixture_bytes("callback_text2video_submitted.json")
    first_chunk_sent = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield content[:40]
        first_chunk_sent.set()
        for start in (40, 120):
            time.sleep(1)
            yield content[start : start + 80]
        yield content[200:]

    result: dict[str, Any] = {}

    def deliver() -> None:
        try:
            result["response"] = httpx.post(
                service.callback_url(None, TEXT2VIDEO), content=slow_body(), timeout=30
            )
        except httpx.HTTPError as exc:  # reported by the assertion below
            result["error"] = exc

    sender = threading.Thread(target=deliver)
    sender.start()
    assert first_chunk_sent.wait(10)
    time.sleep(0.5)  # let the server accept the request and start reading its body
    assert service.process is not None
    process = service.process
    process.send_signal(signal.SIGTERM)
    sender.join(30)

    assert "error" not in result, result
    assert result["response"].status_code == 200, result["response"].text
    assert result["response"].json()["outcome"] == "moved"
    assert process.wait(20) == 0
    service.process = None
    service.start()
    events = service.api("/api/tasks/867283741759111202/events").json()["events"]
    assert [e["body"].encode() for e in events] == [content]


def test_generated_secrets_on_a_shared_database_are_warned_of(
    spawn: Callable[..., Service], postgres: PostgresServer
) -> None:
    """On PostgreSQL, other machines would generate other secrets: serve says to set them."""
    service = spawn(secrets_in_env=False, env={"DATABASE_URL": postgres.create_database()})
    (warning,) = [
        e for e in service.log_entries() if e["message"].startswith("secrets generated on a shared")
    ]
    assert warning["level"] == "warning"
    assert sorted(warning["names"]) == ["ADMIN_TOKEN", "CALLBACK_SECRET", "EVENT_WEBHOOK_SECRET"]


def test_generated_secrets_are_kept_private_and_reused(spawn: Callable[..., Service]) -> None:
    """Without secrets in the environment the service makes, keeps and reuses its own."""
    service = spawn(secrets_in_env=False)
    env = service.environ()
    assert "CALLBACK_SECRET" not in env and "ADMIN_TOKEN" not in env
    assert service.secrets_path.exists()
    assert stat.S_IMODE(service.secrets_path.stat().st_mode) == 0o600
    generated = json.loads(service.secrets_path.read_text())
    assert generated["callback_secret"] not in (CALLBACK_SECRET, "")
    assert generated["admin_token"] not in (ADMIN_TOKEN, "")
    assert generated["event_webhook_secret"].startswith("whsec_")
    notes = [e for e in service.log_entries() if e["message"] == "using generated secrets"]
    assert notes and notes[0]["file"] == str(service.secrets_path.resolve())
    assert sorted(notes[0]["names"]) == ["ADMIN_TOKEN", "CALLBACK_SECRET", "EVENT_WEBHOOK_SECRET"]
    assert "secrets generated on a shared database" not in service.log()  # SQLite: one machine

    token = {"Authorization": f"Bearer {generated['admin_token']}"}
    wrong = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(service.base_url + "/api/tasks", headers=token).status_code == 200
    assert httpx.get(service.base_url + "/api/tasks", headers=wrong).status_code == 401
    service.restart()
    assert httpx.get(service.base_url + "/api/tasks", headers=token).status_code == 200
    assert json.loads(service.secrets_path.read_text()) == generated

    printed = service.cli("callback-url", "--action", TEXT2VIDEO)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert len(lines) == 1
    url = lines[0]
    assert url.startswith(service.base_url + tokens.CALLBACK_PREFIX + "/")
    assert url.endswith("/" + TEXT2VIDEO)
    delivered = httpx.post(url, content=fixture_bytes("callback_text2video_submitted.json"))
    assert delivered.status_code == 200, delivered.text
    task = httpx.get(service.base_url + "/api/tasks/867283741759111202", headers=token).json()
    assert task["action"] == TEXT2VIDEO

    bad = service.cli("callback-url", "--action", "bad")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "action" in bad.stderr and "'bad'" in bad.stderr
    assert "Traceback" not in bad.stderr

    log = service.log()
    assert generated["callback_secret"] not in log
    assert generated["admin_token"] not in log
    assert signature(url) not in log


def test_logs_have_one_line_per_delivery_and_no_secrets(service: Service) -> None:
    """Each delivery is one JSON log line with its outcome; no secret or signature is logged."""
    urls = [
        service.callback_url(tokens.task_ref("kr_01JDX3N5Q8"), TEXT2VIDEO),
        service.callback_url(None, "images/generations"),
        service.callback_url(None, None),
    ]
    accepted = [
        (urls[0], fixture_bytes("callback_text2video_submitted.json")),
        (urls[0], fixture_bytes("callback_text2video_succeed.json")),
        (urls[0], fixture_bytes("callback_text2video_succeed.json")),
        (urls[1], fixture_bytes("callback_images_generations_succeed.json")),
        (urls[2], fixture_bytes("callback_text2video_failed.json")),
    ]
    sig = signature(urls[0])
    refused = [
        (urls[0].replace(sig, sig[::-1]), fixture_bytes("callback_text2video_processing.json")),
        (urls[1], fixture_bytes("callback_text2video_processing.json")),  # bound elsewhere
        (urls[2], b"not json"),
        (urls[2], b'{"task_status": "succeed"}'),
    ]
    answers = []
    for url, content in accepted + refused:
        answers.append(httpx.post(url, content=content, headers=JSON))
    assert [a.status_code for a in answers] == [200] * 5 + [404, 401, 400, 422]
    assert httpx.get(service.base_url + "/api/stats", headers=service.admin).status_code == 200
    wrong = {"Authorization": "Bearer " + ADMIN_TOKEN[::-1]}
    assert httpx.get(service.base_url + "/api/stats", headers=wrong).status_code == 401
    service.stop()

    text = service.log()
    lines = [line for line in text.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is a JSON object
    deliveries = [e for e in entries if e["message"] == "delivery"]
    assert [(e["task_id"], e["status"], e["outcome"]) for e in deliveries] == [
        (a.json()["task_id"], json.loads(content)["task_status"], a.json()["outcome"])
        for a, (_, content) in zip(answers[: len(accepted)], accepted, strict=True)
    ], text
    refusals = [e for e in entries if e["message"] == "delivery refused"]
    reasons = ["unknown_callback_url", "wrong_task", "bad_json", "bad_shape"]
    assert [e["reason"] for e in refusals] == reasons, text
    for entry in deliveries + refusals:
        assert isinstance(entry["latency_ms"], int | float) and entry["latency_ms"] >= 0
        assert entry["level"] in ("info", "warning")
    for secret in (CALLBACK_SECRET, ADMIN_TOKEN, *(signature(url) for url in urls)):
        assert secret not in text
    assert sig[::-1] not in text


def test_a_bad_setting_stops_the_service_with_a_readable_message(tmp_path: Path) -> None:
    """PORT=abc makes `serve` exit 2 with a message that names PORT."""
    service = Service(tmp_path / "data", env={"PORT": "abc"})
    finished = service.cli("serve", timeout=20)
    assert finished.returncode == 2
    assert "PORT" in finished.stderr
    assert "Traceback" not in finished.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("S3_ENDPOINT_URL", "minio:9000/?X-Amz-Signature=leak-signature-0123"),
        ("KLING_API_BASE", "ftp://kling-user:leak-password-0123@api.klingai.com"),
        ("PUBLIC_URL", "media.example.com/?api_key=leak-key-0123"),
    ],
)
def test_a_bad_url_setting_is_named_without_its_credentials(
    tmp_path: Path, name: str, value: str
) -> None:
    """`serve` with a bad URL setting exits 2 naming it, with no password or key in stderr."""
    service = Service(tmp_path / "data", env={name: value})
    finished = service.cli("serve", timeout=20)
    assert finished.returncode == 2
    assert f"{name}: " in finished.stderr and "***" in finished.stderr
    assert "leak-" not in finished.stderr + finished.stdout
