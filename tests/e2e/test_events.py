"""End-to-end outbound events: the real `serve` process sends signed events to a real
endpoint on loopback (`tests.event_receiver`), which checks every signature with the
reference `standardwebhooks` library, and streams them over Server-Sent Events."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from receiver import tokens
from receiver._clock import parse_time
from tests.event_receiver import EventReceiver, event_receiver
from tests.media_server import MediaServer, media_bytes
from tests.support import (
    EVENT_WEBHOOK_SECRET,
    Service,
    fixture_json,
    succeed_payload,
    wait_for,
)

pytestmark = pytest.mark.e2e

T2V = "videos/text2video"
IMAGES = "images/generations"
# Loopback media and endpoints allowed; downloads retried in tens of milliseconds.
DOWNLOADS = {
    "ALLOW_PRIVATE_DOWNLOADS": "true",
    "DOWNLOAD_RETRY_BASE_SECONDS": "0.05",
    "DOWNLOAD_CONCURRENCY": "2",
    "ALLOW_PRIVATE_EVENT_URLS": "true",
}
# The events of a task called back processing, then succeed with one file, then archived.
LIFECYCLE = ["task.updated", "task.updated", "asset.stored", "task.archived"]


@pytest.fixture
def receiver() -> Iterator[EventReceiver]:
    """An event endpoint on loopback, down (connections refused) until the test says."""
    with event_receiver(EVENT_WEBHOOK_SECRET, up=False) as endpoint:
        yield endpoint


@pytest.fixture
def spawn(services: Callable[..., Service], receiver: EventReceiver) -> Callable[..., Service]:
    """Start a service that sends its events to `receiver` and downloads from loopback."""
    return lambda **env: services(env=DOWNLOADS | {"EVENT_WEBHOOK_URLS": receiver.url} | env)


def deliver(service: Service, task_id: str, payload: dict[str, Any], action: str) -> None:
    """POST a callback for `task_id` to the task's own callback URL."""
    external = f"kr_{task_id}"
    payload = payload | {"task_id": task_id, "task_info": {"external_task_id": external}}
    url = service.callback_url(tokens.task_ref(external), action)
    response = httpx.post(url, json=payload, trust_env=False)
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "moved", response.text


def run_task(
    service: Service, media: MediaServer, task_id: str, files: int = 1, action: str = T2V
) -> dict[str, bytes]:
    """Call the task back processing, then succeed with `files` files on `media`, and wait
    until they are downloaded; the files' bodies by URL."""
    like = "png" if action == IMAGES else "mp4"
    bodies = {
        media.add(f"/{task_id}/{n}.{like}", body): body
        for n, body in enumerate(media_bytes(4000, f"{task_id}{n}", like) for n in range(files))
    }
    deliver(service, task_id, fixture_json("callback_text2video_processing.json"), action)
    deliver(service, task_id, succeed_payload(task_id, list(bodies), action), action)
    wait_for(service.archived(task_id), f"{task_id} to be archived")
    return bodies


def outbox(service: Service, task_id: str | None = None) -> list[dict[str, Any]]:
    """The events in the outbox (of one task, if given), oldest first."""
    params = {"limit": 200} | ({"task_id": task_id} if task_id else {})
    response = service.api("/api/events", **params)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    assert response.json()["next_cursor"] is None
    return events[::-1]


def delivery(service: Service, msg_id: str) -> dict[str, Any]:
    """The one delivery of an event (to the one endpoint), with its log of attempts."""
    response = service.api(f"/api/events/{msg_id}")
    assert response.status_code == 200, response.text
    (only,) = response.json()["deliveries"]
    found: dict[str, Any] = only
    return found


def attempted(service: Service, msg_id: str, times: int) -> Callable[[], bool]:
    """A check for `wait_for`: the event's delivery has had `times` attempts recorded."""
    return lambda: len(delivery(service, msg_id)["log"]) >= times


def all_delivered(expected: list[dict[str, Any]]) -> Callable[[EventReceiver], bool]:
    """A check for `EventReceiver.wait_until`: every one of these events has been delivered."""
    wanted = {event["msg_id"] for event in expected}
    return lambda receiver: wanted <= {r.msg_id for r in receiver.delivered()}


def seconds_between(earlier: str, later: str) -> float:
    return (parse_time(later) - parse_time(earlier)).total_seconds()


def assert_delivered_once_in_order(receiver: EventReceiver, expected: list[dict[str, Any]]) -> None:
    """Every event arrived exactly once with a 2xx answer, its body byte for byte as the
    outbox holds it, and each task's events in the order the outbox wrote them; every
    attempt of an event carried the event's own webhook-id and bytes."""
    assert receiver.rejected == []
    delivered = receiver.delivered()
    assert sorted(r.msg_id for r in delivered) == sorted(e["msg_id"] for e in expected)
    by_id = {e["msg_id"]: e for e in expected}
    for arrival in receiver.received:
        event = by_id[arrival.msg_id]
        assert json.loads(arrival.body) == event["payload"]
        assert (arrival.type, arrival.task_id) == (event["type"], event["task_id"])
    # One body, one webhook-id: no event came back under another id.
    bodies = {r.body for r in receiver.received}
    assert len(bodies) == len(by_id)
    for task_id in {e["task_id"] for e in expected}:
        arrived = [r.msg_id for r in delivered if r.task_id == task_id]
        assert arrived == [e["msg_id"] for e in expected if e["task_id"] == task_id]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_task_s_events_arrive_signed_in_order_and_are_logged(
    backend: str,
    request: pytest.FixtureRequest,
    spawn: Callable[..., Service],
    receiver: EventReceiver,
    media: MediaServer,
) -> None:
    """A task called back processing, then succeed with two images, then archived, sends
    task.updated (processing), task.updated (succeed), asset.stored twice and
    task.archived, in that order, each signed so that `standardwebhooks` verifies it (and
    refuses it under another secret); the API's delivery log shows each delivered at the
    first attempt, answered 200. On SQLite and PostgreSQL."""
    env = {}
    if backend == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres").create_database()
    receiver.answer(200)
    service = spawn(**env)

    bodies = run_task(service, media, "evorder", files=2, action=IMAGES)
    expected = outbox(service, "evorder")
    receiver.wait_until(all_delivered(expected), "the task's events", 20)

    assert_delivered_once_in_order(receiver, expected)
    arrived = receiver.delivered()
    assert [r.type for r in arrived] == [
        "task.updated",
        "task.updated",
        "asset.stored",
        "asset.stored",
        "task.archived",
    ]
    processing, succeeded, *stored, archived = arrived
    assert (processing.data["status"], succeeded.data["status"]) == ("processing", "succeed")
    assert not succeeded.data["archived"]
    assert {(a.data["url"], a.data["state"], a.data["sha256"]) for a in stored} == {
        (url, "stored", sha(body)) for url, body in bodies.items()
    }
    assert archived.data["archived"] is True
    assert [a["state"] for a in archived.data["assets"]] == ["stored", "stored"]
    other = Webhook("whsec_" + "b3RoZXItc2VjcmV0LW9mLXRoaXJ0eS10d28tYnl0ZXMh")
    for arrival in arrived:
        assert arrival.headers["webhook-signature"].startswith("v1,")
        assert abs(int(arrival.headers["webhook-timestamp"]) - time.time()) < 60
        with pytest.raises(WebhookVerificationError):
            other.verify(arrival.body, arrival.headers)
        log = delivery(service, arrival.msg_id)
        assert (log["endpoint"], log["state"], log["attempts"]) == (receiver.url, "delivered", 1)
        (attempt,) = log["log"]
        assert (attempt["status"], attempt["error"]) == (200, None)
        assert log["delivered_at"] == attempt["at"]


def test_an_outage_of_refusals_then_500s_loses_and_repeats_nothing(
    spawn: Callable[..., Service], receiver: EventReceiver, media: MediaServer
) -> None:
    """The endpoint refuses connections while one task's events are written, then answers
    500 (with Retry-After: 8) while another's are, then comes back: every event arrives
    once, under the one webhook-id and the same bytes on every attempt, each task's in
    order.

    What it shows of the schedule: the refused event is tried again 5 s (+-10%) later, the
    one answered 500 with Retry-After: 8 after 8 s, not 5; each task's later events wait
    behind its first, so they are first sent after the outage. The outage is short: every
    event is delivered by its second attempt (a third would come 5 min later)."""
    service = spawn()

    run_task(service, media, "evdown")
    (refused, *_) = outbox(service, "evdown")
    wait_for(attempted(service, refused["msg_id"], 1), "the refused attempt")
    receiver.answer(500, {"Retry-After": "8"})
    run_task(service, media, "ev500")
    (failed, *_) = outbox(service, "ev500")
    receiver.wait_until(lambda r: len(r.failed()) == 1, "the attempt answered 500", 10)
    receiver.answer(200)
    expected = outbox(service)
    assert [e["type"] for e in expected] == LIFECYCLE * 2
    receiver.wait_until(all_delivered(expected), "every event after the outage", 20)

    assert_delivered_once_in_order(receiver, expected)
    assert [r.msg_id for r in receiver.failed()] == [failed["msg_id"]]
    first, second = delivery(service, refused["msg_id"])["log"]
    assert (first["status"], second["status"]) == (None, 200)
    assert "ConnectError" in first["error"]
    assert 4.5 - 0.01 <= seconds_between(first["at"], second["at"]) <= 7
    first, second = delivery(service, failed["msg_id"])["log"]
    assert (first["status"], first["error"], second["status"]) == (500, "HTTP 500", 200)
    assert 8 - 0.01 <= seconds_between(first["at"], second["at"]) <= 10
    for event in expected:
        log = delivery(service, event["msg_id"])
        assert log["state"] == "delivered"
        assert log["attempts"] == (2 if event in (refused, failed) else 1)


def test_events_written_before_a_sigkill_are_delivered_after_restart(
    spawn: Callable[..., Service], receiver: EventReceiver, media: MediaServer
) -> None:
    """Events written by ledger changes but not delivered (the endpoint refused the first
    of each task; the rest were never tried) when the service is SIGKILLed are sent by the
    service started again on the same data: each once, in order, the first at its retry."""
    service = spawn()
    run_task(service, media, "evkill1")
    run_task(service, media, "evkill2")
    expected = outbox(service)
    assert [e["type"] for e in expected] == LIFECYCLE * 2
    firsts = [expected[0], expected[len(LIFECYCLE)]]
    for event in firsts:
        wait_for(attempted(service, event["msg_id"], 1), "the refused attempt")
    assert receiver.received == []

    service.stop(signal.SIGKILL)
    receiver.answer(200)
    service.start()
    receiver.wait_until(all_delivered(expected), "the events after the restart", 20)

    assert outbox(service) == expected
    assert_delivered_once_in_order(receiver, expected)
    for event in expected:
        log = delivery(service, event["msg_id"])
        assert log["state"] == "delivered"
        assert [a["status"] for a in log["log"]] == ([None, 200] if event in firsts else [200])


def frames(response: httpx.Response) -> Iterator[dict[str, str]]:
    """The Server-Sent Events of a stream, as {field: value}; comments are skipped."""
    frame: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if frame:
                yield frame
            frame = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            frame[name] = value.removeprefix(" ")


def read_events(stream: Iterator[dict[str, str]], count: int) -> list[dict[str, str]]:
    """The next `count` event frames of a stream (the `retry:` advice is skipped)."""
    found: list[dict[str, str]] = []
    for frame in stream:
        if "id" in frame:
            found.append(frame)
            if len(found) == count:
                break
    assert len(found) == count, found
    return found


def open_stream(service: Service, **headers: str) -> Any:
    """GET /api/events/stream; a read waits at most 10 s (the stream has 15 s heartbeats)."""
    return httpx.stream(
        "GET",
        service.base_url + "/api/events/stream",
        headers=service.admin | headers,
        timeout=httpx.Timeout(10, connect=5),
        trust_env=False,
    )


def as_frame(event: dict[str, Any]) -> dict[str, str]:
    """The frame the stream sends for an event of GET /api/events."""
    data = {"msg_id": event["msg_id"], "task_id": event["task_id"], **event["payload"]}
    return {"id": str(event["seq"]), "event": event["type"], "data": json.dumps(data)}


def comparable(frame: dict[str, str]) -> dict[str, Any]:
    return frame | {"data": json.loads(frame["data"])}


def test_the_stream_sends_new_events_and_resumes_after_last_event_id(
    spawn: Callable[..., Service], media: MediaServer
) -> None:
    """GET /api/events/stream sends events written after it opened as id/event/data
    frames, the same as GET /api/events lists them; reconnecting with Last-Event-ID
    sends the events after that id, those the first stream had not read and those
    written while no stream was open, none twice and none missing."""
    service = spawn(EVENT_WEBHOOK_URLS="")
    run_task(service, media, "evbefore")
    before = outbox(service)

    with open_stream(service) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = frames(response)
        assert next(stream) == {"retry": "2000"}
        run_task(service, media, "evlive")
        first = read_events(stream, 2)
    run_task(service, media, "evafter")
    with open_stream(service, **{"Last-Event-ID": first[-1]["id"]}) as response:
        rest = read_events(frames(response), 2 * len(LIFECYCLE) - 2)

    written = outbox(service)[len(before) :]
    assert [e["task_id"] for e in written] == ["evlive"] * 4 + ["evafter"] * 4
    assert [comparable(f) for f in first + rest] == [comparable(as_frame(e)) for e in written]


def test_sigterm_stops_a_service_with_an_open_stream_promptly(
    spawn: Callable[..., Service],
) -> None:
    """A service with an event stream open exits 0 within 5 s of SIGTERM (its graceful
    timeout is 30 s): the stream ends cleanly and does not hold the shutdown."""
    service = spawn(EVENT_WEBHOOK_URLS="")
    with open_stream(service) as response:
        stream = frames(response)
        assert next(stream) == {"retry": "2000"}
        started = time.monotonic()
        code = service.stop(signal.SIGTERM, timeout=40)
        took = time.monotonic() - started
        assert took < 5, f"SIGTERM took {took:.1f} s"
        assert list(stream) == []  # the response ended properly, not cut off
    assert code == 0


def test_a_token_in_an_endpoint_s_query_stays_out_of_the_log(
    spawn: Callable[..., Service], receiver: EventReceiver
) -> None:
    """An endpoint URL may carry its token in the query: the event reaches it, and the
    service's log names the endpoint with the token hidden, on every line."""
    token = "endpoint-token-0123456789abcdef"
    receiver.answer(200)
    service = spawn(EVENT_WEBHOOK_URLS=f"{receiver.url}?token={token}")
    deliver(service, "evtoken", fixture_json("callback_text2video_processing.json"), T2V)
    receiver.wait_until(lambda r: len(r.delivered()) == 1, "the event", 10)
    wait_for(lambda: "event delivered" in service.log(), "the delivery's log line", 5)

    assert token not in service.log()
    (sent,) = [e for e in service.log_entries() if e.get("message") == "event delivered"]
    assert sent["endpoint"] == f"{receiver.url}?token=***"


def test_a_replay_sends_an_event_waiting_for_its_retry_at_once(
    spawn: Callable[..., Service], receiver: EventReceiver
) -> None:
    """An event answered 500 with Retry-After: 3600 waits an hour for its next attempt;
    once the endpoint is back, POST /api/events/replay {"since": "1h"} has it sent at once
    (then its replayed copy), every time under its one webhook-id and with the same bytes."""
    receiver.answer(500, {"Retry-After": "3600"})
    service = spawn()
    deliver(service, "evreplay", fixture_json("callback_text2video_processing.json"), T2V)
    receiver.wait_until(lambda r: len(r.failed()) == 1, "the attempt answered 500", 10)
    receiver.answer(200)

    response = httpx.post(
        service.base_url + "/api/events/replay",
        json={"since": "1h"},
        headers=service.admin,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    assert response.json()["queued"] == 1
    receiver.wait_until(lambda r: len(r.delivered()) == 2, "the event and its copy", 10)

    (event,) = outbox(service)
    assert [r.msg_id for r in receiver.received] == [event["msg_id"]] * 3
    assert len({r.body for r in receiver.received}) == 1
    response = service.api(f"/api/events/{event['msg_id']}")
    retried, replayed = response.json()["deliveries"]
    assert [a["status"] for a in retried["log"]] == [500, 200]
    assert [a["status"] for a in replayed["log"]] == [200]


def test_the_replay_command_sends_past_events_again(
    spawn: Callable[..., Service], receiver: EventReceiver, media: MediaServer
) -> None:
    """`kling-receiver events replay --since 1h --type task.updated` queues the task's
    events of that type again, each delivered a second time under its own webhook-id; a
    start that is not a time is refused and queues nothing."""
    receiver.answer(200)
    service = spawn()
    run_task(service, media, "evcli")
    events = outbox(service, "evcli")
    wait_for(lambda: all_delivered(events)(receiver), "the first deliveries")

    bad = service.cli("events", "replay", "--since", "yesterday")
    assert bad.returncode == 2 and "since must be a time" in bad.stderr
    done = service.cli("events", "replay", "--since", "1h", "--type", "task.updated")
    assert done.returncode == 0, done.stderr
    updated = [e for e in events if e["type"] == "task.updated"]
    assert done.stdout.startswith(f"queued {len(updated)} event deliveries written since ")
    wait_for(lambda: len(receiver.delivered()) == len(events) + len(updated), "the replayed events")
    again = [r.msg_id for r in receiver.delivered()[len(events) :]]
    assert again == [e["msg_id"] for e in sorted(updated, key=lambda e: e["seq"])]
