"""The callback endpoint: what it records, and everything it refuses without recording."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook
from starlette.routing import Match
from starlette.testclient import TestClient

from receiver import tokens
from receiver._sqlite import engine as engine_module
from receiver._sqlite.engine import _MAX_RESTARTS
from receiver.app import create_app
from receiver.routes import callbacks
from receiver.settings import Settings, load_settings
from tests.pg_server import PostgresServer
from tests.support import ADMIN_TOKEN, CALLBACK_SECRET, assert_error, fixture_bytes, fixture_json

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TASK_ID = "867283741759111202"
MB = 1024 * 1024


def url_for(ref: str | None = None, action: str | None = None) -> str:
    """A correctly signed callback path for `ref` (a fresh hand-made one by default)."""
    return tokens.callback_path(CALLBACK_SECRET, ref or tokens.new_channel_ref(), action)


def task_body(task_id: str = TASK_ID, status: str = "submitted", **fields: Any) -> bytes:
    return json.dumps({"task_id": task_id, "task_status": status, **fields}).encode()


def recorded_tasks(client: TestClient) -> list[dict[str, Any]]:
    response = client.get("/api/tasks", headers=ADMIN)
    assert response.status_code == 200
    tasks: list[dict[str, Any]] = response.json()["tasks"]
    return tasks


def recorded_task(client: TestClient, task_id: str) -> dict[str, Any]:
    response = client.get(f"/api/tasks/{task_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


def recorded_events(client: TestClient, task_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/tasks/{task_id}/events", headers=ADMIN)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def assert_nothing_recorded(client: TestClient) -> None:
    assert recorded_tasks(client) == []


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def signed_client(tmp_path: Path, webhook_secret: str) -> Iterator[TestClient]:
    """A client for an app that requires Standard Webhooks signatures."""
    settings = load_settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        callback_secret=CALLBACK_SECRET,
        admin_token=ADMIN_TOKEN,
        kling_webhook_secret=webhook_secret,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def signature_headers(
    secret: str, body: bytes, at: datetime | None = None, msg_id: str = "msg_2pWd8YkZq"
) -> dict[str, str]:
    at = at or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
    }


# -- the URL is the credential --------------------------------------------------


def test_forged_signature_in_url_is_refused(client: TestClient) -> None:
    """A callback URL whose signature was not made with CALLBACK_SECRET is refused as unknown."""
    forged = f"{tokens.CALLBACK_PREFIX}/{tokens.task_ref('A')}/{secrets.token_urlsafe(24)}"
    response = client.post(forged, content=task_body())
    assert_error(response, 404, "unknown_callback_url", "callback")
    assert_nothing_recorded(client)


def test_action_swapped_in_url_is_refused(client: TestClient) -> None:
    """The action is covered by the URL's signature, so it cannot be changed."""
    signed = url_for(tokens.task_ref("A"), "videos/text2video")
    swapped = signed.removesuffix("videos/text2video") + "images/generations"
    response = client.post(swapped, content=task_body())
    assert_error(response, 404, "unknown_callback_url")
    assert_nothing_recorded(client)


def test_url_without_token_is_not_found(client: TestClient) -> None:
    """A callback path without a signature is refused as an unknown URL, counted, not recorded."""
    response = client.post(f"{tokens.CALLBACK_PREFIX}/x", content=task_body())
    assert_error(response, 404, "unknown_callback_url")
    assert_nothing_recorded(client)
    stats = client.get("/api/stats", headers=ADMIN).json()
    assert stats["refused"] == {"unknown_callback_url": 1}


def test_task_bound_to_another_url_is_refused(client: TestClient) -> None:
    """A task that reported through one task's URL is refused through another task's URL."""
    first = task_body(status="submitted")
    assert client.post(url_for(tokens.task_ref("B")), content=first).status_code == 200

    response = client.post(url_for(tokens.task_ref("A")), content=task_body(status="processing"))

    assert_error(response, 401, "wrong_task", "another callback URL")
    assert [task["task_id"] for task in recorded_tasks(client)] == [TASK_ID]
    assert recorded_task(client, TASK_ID)["status"] == "submitted"
    assert recorded_task(client, TASK_ID)["external_task_id"] == "B"
    assert [event["body"].encode() for event in recorded_events(client, TASK_ID)] == [first]


def test_task_bound_to_another_hand_made_url_is_refused(client: TestClient) -> None:
    """A task that reported through one hand-made URL is refused through another one."""
    assert client.post(url_for(), content=task_body(status="submitted")).status_code == 200

    response = client.post(url_for(), content=task_body(status="processing"))

    assert_error(response, 401, "wrong_task", "another callback URL")
    assert len(recorded_events(client, TASK_ID)) == 1


def test_payload_naming_another_external_task_id_is_refused(client: TestClient) -> None:
    """A URL made for task A refuses a payload whose task_info names external_task_id B."""
    body = task_body(task_info={"external_task_id": "B"})
    response = client.post(url_for(tokens.task_ref("A")), content=body)
    assert_error(response, 401, "wrong_task", "external_task_id")
    assert_nothing_recorded(client)


def test_url_already_used_by_another_task_is_refused(client: TestClient) -> None:
    """Once a task's URL has carried one task_id, it refuses any other."""
    url = url_for(tokens.task_ref("A"))
    assert client.post(url, content=task_body("first-task")).status_code == 200

    response = client.post(url, content=task_body("second-task"))

    assert_error(response, 401, "wrong_task", "another task")
    assert [task["task_id"] for task in recorded_tasks(client)] == ["first-task"]


# -- Standard Webhooks signatures ------------------------------------------------


def test_correctly_signed_delivery_is_accepted(
    signed_client: TestClient, webhook_secret: str
) -> None:
    """With a webhook secret set, a delivery signed with it is recorded, headers and all."""
    body = task_body()
    headers = signature_headers(webhook_secret, body)

    response = signed_client.post(url_for(), content=body, headers=headers)

    assert response.status_code == 200, response.text
    assert response.json()["ok"] is True
    [event] = recorded_events(signed_client, TASK_ID)
    assert event["body"].encode() == body
    assert {name: event["headers"][name] for name in headers} == headers


def test_signature_made_with_another_secret_is_refused(signed_client: TestClient) -> None:
    """A signature made with a secret other than KLING_WEBHOOK_SECRET is refused."""
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    body = task_body()
    response = signed_client.post(url_for(), content=body, headers=signature_headers(other, body))
    assert_error(response, 401, "bad_signature", "no v1 signature matches")
    assert_nothing_recorded(signed_client)


def test_signature_of_another_body_is_refused(
    signed_client: TestClient, webhook_secret: str
) -> None:
    """A body changed after signing is refused."""
    headers = signature_headers(webhook_secret, task_body(status="processing"))
    response = signed_client.post(url_for(), content=task_body(status="succeed"), headers=headers)
    assert_error(response, 401, "bad_signature", "no v1 signature matches")
    assert_nothing_recorded(signed_client)


@pytest.mark.parametrize(
    ("offset", "words"),
    [(timedelta(minutes=-6), "too old"), (timedelta(minutes=6), "too new")],
    ids=["stale", "future"],
)
def test_timestamp_outside_five_minutes_is_refused(
    signed_client: TestClient, webhook_secret: str, offset: timedelta, words: str
) -> None:
    """A correctly signed delivery more than 5 minutes off the clock is refused (no replays)."""
    body = task_body()
    headers = signature_headers(webhook_secret, body, at=datetime.now(UTC) + offset)
    response = signed_client.post(url_for(), content=body, headers=headers)
    assert_error(response, 401, "bad_signature", words)
    assert_nothing_recorded(signed_client)


@pytest.mark.parametrize(
    "missing",
    [("webhook-id",), ("webhook-timestamp",), ("webhook-signature",), ()],
    ids=["id", "timestamp", "signature", "all"],
)
def test_missing_signature_headers_are_refused(
    signed_client: TestClient, webhook_secret: str, missing: tuple[str, ...]
) -> None:
    """With a webhook secret set, a delivery lacking any of the three headers is refused."""
    body = task_body()
    headers = signature_headers(webhook_secret, body)
    kept = {name: value for name, value in headers.items() if missing and name not in missing}
    response = signed_client.post(url_for(), content=body, headers=kept)
    assert_error(response, 401, "bad_signature", *(missing or headers), "missing")
    assert_nothing_recorded(signed_client)


@pytest.mark.parametrize(
    "signature", ["v1", "garbage", "v1,a,b", "v1,c2lnbmF0dXJl", ",abc", "v1,!!!!"]
)
def test_malformed_signature_header_is_refused_in_words(
    signed_client: TestClient, signature: str
) -> None:
    """A webhook-signature header that is not `v1,<base64>` is refused with a readable reason."""
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(datetime.now(UTC).timestamp())),
        "webhook-signature": signature,
    }
    response = signed_client.post(url_for(), content=task_body(), headers=headers)
    assert_error(response, 401, "bad_signature", "v1,<base64>")
    assert "unpack" not in response.json()["message"]
    assert_nothing_recorded(signed_client)


def test_non_utf8_body_is_refused_when_signatures_are_required(signed_client: TestClient) -> None:
    """With a webhook secret set, a body that is not UTF-8 is refused, saying so."""
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(datetime.now(UTC).timestamp())),
        "webhook-signature": "v1,c2lnbmF0dXJl",
    }
    response = signed_client.post(url_for(), content=b"\xff\xfe{}", headers=headers)
    assert_error(response, 401, "bad_signature", "not UTF-8")
    assert_nothing_recorded(signed_client)


# -- size --------------------------------------------------------------------------


def test_body_over_limit_with_content_length_is_refused(client: TestClient) -> None:
    """A 5 MB body that declares its length is refused with 413."""
    body = b" " * (5 * MB) + task_body()
    response = client.post(url_for(), content=body)
    assert response.request.headers["content-length"] == str(len(body))
    assert_error(response, 413, "body_too_large", f"{MB} bytes")
    assert_nothing_recorded(client)


def test_chunked_body_over_limit_is_refused(client: TestClient) -> None:
    """A 5 MB chunked body (no Content-Length to go by) is refused with 413."""

    def chunks() -> Iterator[bytes]:
        for _ in range(80):
            yield b" " * (64 * 1024)

    response = client.post(url_for(), content=chunks())

    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "body_too_large", f"{MB} bytes")
    assert_nothing_recorded(client)


def test_body_of_exactly_the_limit_is_accepted(tmp_path: Path) -> None:
    """MAX_CALLBACK_BYTES is inclusive: a body of that size is recorded, one byte more is not."""
    settings = load_settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        callback_secret=CALLBACK_SECRET,
        admin_token=ADMIN_TOKEN,
        max_callback_bytes=2048,
    )
    body = task_body()
    with TestClient(create_app(settings)) as client:
        url = url_for()
        too_large = client.post(url, content=body + b" " * (2049 - len(body)))
        assert_error(too_large, 413, "body_too_large", "2048 bytes")
        assert_nothing_recorded(client)
        exact = client.post(url, content=body + b" " * (2048 - len(body)))
        assert exact.status_code == 200, exact.text


# -- the body ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (task_body()[:-7], "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"task_id": "caf\xe9", "task_status": "submitted"}', "not UTF-8"),
    ],
    ids=["truncated", "empty", "latin-1"],
)
def test_body_that_is_not_json_is_refused(client: TestClient, body: bytes, words: str) -> None:
    """A body that is not UTF-8 JSON is refused with 400."""
    response = client.post(url_for(), content=body)
    assert_error(response, 400, "bad_json", words)
    assert_nothing_recorded(client)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ([{"task_id": TASK_ID, "task_status": "succeed"}], "JSON object"),
        ("succeed", "JSON object"),
        ({"task_status": "submitted"}, "task_id"),
        ({"task_id": TASK_ID}, "task_status"),
        ({"task_id": "../../etc", "task_status": "submitted"}, "task_id"),
        ({"task_id": "7" * 10_000, "task_status": "submitted"}, "task_id"),
        ({"task_id": "", "task_status": "submitted"}, "task_id"),
        ({"task_id": TASK_ID, "task_status": "succeed", "task_result": {"videos": [{}]}}, "url"),
    ],
    ids=[
        "array",
        "string",
        "no-task_id",
        "no-task_status",
        "path-traversal",
        "10000-chars",
        "empty-task_id",
        "video-without-url",
    ],
)
def test_json_that_is_not_a_kling_task_is_refused(
    client: TestClient, data: Any, words: str
) -> None:
    """JSON that is not a Kling task object is refused with 422 and a reason naming the field."""
    response = client.post(url_for(), content=json.dumps(data).encode())
    assert_error(response, 422, "bad_shape", words)
    assert len(response.json()["message"]) < 500  # a 10 000-char id is not echoed back
    assert_nothing_recorded(client)


# -- what is recorded ------------------------------------------------------------


def test_unknown_status_is_recorded_without_moving_the_task(client: TestClient) -> None:
    """A status the service does not know is kept as an event, and the task's status stays."""
    url = url_for()
    client.post(url, content=task_body(status="submitted"))
    queued = task_body(status="queued", updated_at=1764043300000)

    response = client.post(url, content=queued)

    assert response.status_code == 200
    assert response.json() == {
        "ok": True,
        "task_id": TASK_ID,
        "outcome": "kept",
        "status": "submitted",
    }
    assert recorded_task(client, TASK_ID)["status"] == "submitted"
    events = recorded_events(client, TASK_ID)
    assert [(e["status"], e["applied"]) for e in events] == [
        ("submitted", True),
        ("queued", False),
    ]
    assert events[-1]["body"].encode() == queued


def test_same_delivery_fifty_times_is_one_event(client: TestClient) -> None:
    """A delivery repeated 50 times is one event received 50 times and one update of the task."""
    url, body = url_for(), fixture_bytes("callback_text2video_succeed.json")
    outcomes = [client.post(url, content=body).json()["outcome"] for _ in range(50)]

    assert outcomes == ["moved"] + ["duplicate"] * 49
    [event] = recorded_events(client, TASK_ID)
    assert event["times_received"] == 50
    task = recorded_task(client, TASK_ID)
    assert task["updates"] == 1
    assert len(task["assets"]) == 1


def test_processing_after_succeed_does_not_regress(client: TestClient) -> None:
    """A `processing` delivery that arrives after `succeed` is kept, and the task stays succeed."""
    url = url_for()
    client.post(url, content=fixture_bytes("callback_text2video_succeed.json"))

    response = client.post(url, content=fixture_bytes("callback_text2video_processing.json"))

    assert response.status_code == 200
    assert response.json()["outcome"] == "kept"
    assert response.json()["status"] == "succeed"
    task = recorded_task(client, TASK_ID)
    assert task["status"] == "succeed"
    assert task["updates"] == 2
    assert [a["state"] for a in task["assets"]] == ["pending"]
    events = recorded_events(client, TASK_ID)
    assert [(e["status"], e["applied"]) for e in events] == [
        ("succeed", True),
        ("processing", False),
    ]


def test_later_failed_does_not_undo_succeed(client: TestClient) -> None:
    """A `failed` delivery stamped after `succeed` is kept, but the task and its files stay."""
    url = url_for()
    client.post(url, content=fixture_bytes("callback_text2video_succeed.json"))
    failed = task_body(status="failed", task_status_msg="late", updated_at=1764043999999)

    response = client.post(url, content=failed)

    assert response.json()["outcome"] == "kept"
    task = recorded_task(client, TASK_ID)
    assert (task["status"], task["status_msg"]) == ("succeed", "")
    assert len(task["assets"]) == 1


@pytest.mark.parametrize("action", [None, "videos/text2video"])
def test_get_on_callback_url_is_method_not_allowed(client: TestClient, action: str | None) -> None:
    """GET on a valid callback URL answers 405 in JSON, naming POST as the allowed method."""
    response = client.get(url_for(tokens.task_ref("A"), action))
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert_nothing_recorded(client)


FIXTURE_ACTIONS = [
    ("callback_text2video_submitted.json", "videos/text2video"),
    ("callback_text2video_processing.json", "videos/text2video"),
    ("callback_text2video_succeed.json", "videos/text2video"),
    ("callback_text2video_failed.json", "videos/text2video"),
    ("callback_images_generations_succeed.json", "images/generations"),
    ("callback_images_aggregator_variant.json", "images/generations"),
    ("callback_video_extend_succeed.json", "videos/video-extend"),
    ("callback_virtual_try_on_succeed.json", "images/kolors-virtual-try-on"),
    ("callback_future_fields.json", "videos/image2video"),
]


def expected_assets(payload: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(kind, index, url) of each file a payload names: videos by position, images by index."""
    result = payload.get("task_result") or {}
    videos = [("video", i, video["url"]) for i, video in enumerate(result.get("videos", []))]
    images = [
        ("image", image.get("index", i), image["url"])
        for i, image in enumerate(result.get("images", []))
    ]
    return videos + images


@pytest.mark.parametrize(("name", "action"), FIXTURE_ACTIONS)
def test_sample_callback_is_recorded(client: TestClient, name: str, action: str) -> None:
    """Each sample callback is acknowledged, recorded verbatim, and its files queued as pending."""
    payload, body = fixture_json(name), fixture_bytes(name)
    external = (payload.get("task_info") or {}).get("external_task_id")
    ref = tokens.task_ref(external) if external else tokens.new_channel_ref()

    response = client.post(url_for(ref, action), content=body)

    assert response.status_code == 200, response.text
    assert response.json() == {
        "ok": True,
        "task_id": payload["task_id"],
        "outcome": "moved",
        "status": payload["task_status"],
    }
    task = recorded_task(client, payload["task_id"])
    assert task["status"] == payload["task_status"]
    assert task["status_msg"] == payload["task_status_msg"]
    assert task["action"] == action
    assert task["external_task_id"] == external
    assets = task["assets"]
    assert sorted((a["kind"], a["index"], a["url"]) for a in assets) == sorted(
        expected_assets(payload)
    )
    assert bool(assets) == (payload["task_status"] == "succeed")
    assert all(a["state"] == "pending" and a["location"] is None for a in assets)
    [event] = recorded_events(client, payload["task_id"])
    assert event["body"].encode() == body
    assert event["source"] == "callback"


@pytest.mark.parametrize(
    "action",
    [
        "images/generations",
        "videos/text2video",
        "videos/image2video",
        "videos/video-extend",
        "videos/lip-sync",
        "images/kolors-virtual-try-on",
        "videos/omni-video",
        None,
    ],
)
def test_action_in_url_is_the_tasks_action(client: TestClient, action: str | None) -> None:
    """The action a callback URL was made with is recorded as the task's action."""
    response = client.post(url_for(tokens.task_ref("A"), action), content=task_body())
    assert response.status_code == 200, response.text
    assert recorded_task(client, TASK_ID)["action"] == action


def test_kept_headers_include_webhook_id_but_never_credentials(client: TestClient) -> None:
    """An event keeps delivery headers such as webhook-id, never Authorization or Cookie."""
    headers = {
        "Authorization": "Bearer sk-live-provider-key",
        "Cookie": "session=abc123",
        "webhook-id": "msg_2pWd8YkZq",
        "X-Request-Id": "req-42",
        "User-Agent": "Kling-Callback/1.0",
    }
    client.post(url_for(), content=task_body(), headers=headers)

    [event] = recorded_events(client, TASK_ID)
    kept = {name.lower(): value for name, value in event["headers"].items()}
    assert kept["webhook-id"] == "msg_2pWd8YkZq"
    assert kept["x-request-id"] == "req-42"
    assert kept["user-agent"] == "Kling-Callback/1.0"
    assert "authorization" not in kept
    assert "cookie" not in kept
    assert "sk-live-provider-key" not in json.dumps(event["headers"])


# -- counters ------------------------------------------------------------------------


def stats(client: TestClient) -> dict[str, dict[str, int]]:
    """This process's delivery counters from /api/stats (without the ledger's durable ones)."""
    response = client.get("/api/stats", headers=ADMIN)
    assert response.status_code == 200
    counters: dict[str, dict[str, int]] = response.json()
    assert set(counters.pop("ledger")) == {
        "polls",
        "verifications",
        "recovered_by_polling",
        "recovered_by_sweep",
        "flagged",
    }
    return counters


def test_refused_deliveries_are_counted_by_reason(client: TestClient) -> None:
    """Each refused delivery adds one to /api/stats under "refused", by its error code."""
    assert stats(client) == {"deliveries": {}, "refused": {}}
    forged = f"{tokens.CALLBACK_PREFIX}/{tokens.task_ref('A')}/{secrets.token_urlsafe(24)}"
    client.post(forged, content=task_body())
    client.post(url_for(), content=b" " * (5 * MB))
    client.post(url_for(), content=b"{")
    client.post(url_for(), content=b"\xff")
    client.post(url_for(), content=b"[]")
    client.post(
        url_for(tokens.task_ref("A")), content=task_body(task_info={"external_task_id": "B"})
    )
    client.post(url_for(tokens.task_ref("C")), content=task_body("accepted-task"))

    assert stats(client) == {
        "deliveries": {"moved": 1},
        "refused": {
            "unknown_callback_url": 1,
            "body_too_large": 1,
            "bad_json": 2,
            "bad_shape": 1,
            "wrong_task": 1,
        },
    }


def test_refused_signatures_are_counted(signed_client: TestClient, webhook_secret: str) -> None:
    """Deliveries refused for their signature are counted under "refused" as bad_signature."""
    body = task_body()
    stale = signature_headers(webhook_secret, body, at=datetime.now(UTC) - timedelta(minutes=6))
    signed_client.post(url_for(), content=body, headers=stale)
    signed_client.post(url_for(), content=body)
    assert stats(signed_client)["refused"] == {"bad_signature": 2}


@pytest.mark.parametrize("suffix", ["/", "/extra", "//", "/a/b/c"])
def test_callback_paths_the_routes_do_not_match_are_unknown(
    client: TestClient, suffix: str
) -> None:
    """The direct path to the endpoint takes only what its routes match; the rest is unknown."""
    response = client.post(url_for(tokens.task_ref("A")) + suffix, content=task_body())
    assert_error(response, 404, "unknown_callback_url")
    assert_nothing_recorded(client)


@given(st.lists(st.sampled_from(["", "a", "b9", "%2F", "é", "x-y.z"]), max_size=6))
def test_the_direct_path_takes_exactly_what_the_delivery_routes_match(
    segments: list[str],
) -> None:
    """For any path under the callback prefix, `direct` finds the endpoint exactly when a
    delivery route matches it fully, with the same path parameters."""
    path = "/".join([tokens.CALLBACK_PREFIX, *segments])
    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": path, "root_path": ""}
    routed = None
    for route in callbacks.routes:
        match, child = route.matches(dict(scope))
        if match is Match.FULL:
            routed = child
            break
    endpoint = callbacks.direct(scope)
    if endpoint is None:
        assert routed is None or routed["endpoint"] is not callbacks.receive
    else:
        assert routed is not None and routed["endpoint"] is endpoint
        assert scope["path_params"] == routed["path_params"]


def test_a_body_sent_in_chunks_is_read_whole(client: TestClient) -> None:
    """A body that arrives in several pieces is recorded as the bytes that were sent."""
    body = task_body(status="processing")
    pieces = iter([body[:7], body[7:20], body[20:]])
    response = client.post(url_for(tokens.task_ref("A")), content=pieces)
    assert response.status_code == 200, response.text
    assert recorded_events(client, TASK_ID)[0]["body"] == body.decode()


# -- a ledger that cannot record ---------------------------------------------------


def test_a_dead_ledger_writer_is_a_503_and_not_ready(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the writer fails, deliveries (and API writes) get 503; once it stays down,
    /readyz says so too, though the database's readers still answer."""

    def fault(conn: object, batch: object) -> None:
        raise RuntimeError("injected writer fault")

    monkeypatch.setattr(engine_module, "_run_together", fault)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        for _ in range(_MAX_RESTARTS):
            assert_error(client.post(url_for(), content=task_body()), 503, "ledger_unavailable")
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert f"writer failed {_MAX_RESTARTS} times in a row" in ready.json()["reason"]
        assert_error(client.post(url_for(), content=task_body()), 503, "ledger_unavailable")
        retry = client.post(f"/api/tasks/{TASK_ID}/retry", headers=ADMIN)
        assert_error(retry, 503, "ledger_unavailable")
        assert recorded_tasks(client) == []


def test_a_postgresql_that_goes_away_is_a_503_until_it_returns(
    settings: Settings, postgres: PostgresServer
) -> None:
    """On PostgreSQL, a database that stops answering makes deliveries 503 (the sender
    retries) and /readyz fail; once it is back the same process records them again."""
    on_postgres = settings.model_copy(update={"database_url": postgres.create_database()})
    with TestClient(create_app(on_postgres)) as client:
        assert client.get("/readyz").status_code == 200
        with postgres.stopped():
            assert_error(client.post(url_for(), content=task_body()), 503, "ledger_unavailable")
            assert client.get("/readyz").status_code == 503
        assert client.get("/readyz").status_code == 200
        response = client.post(url_for(), content=task_body())
        assert response.status_code == 200, response.text
        assert [task["task_id"] for task in recorded_tasks(client)] == [TASK_ID]
