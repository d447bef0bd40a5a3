"""/api/events on both ledger backends: the list and its paging, each event's delivery
log, and replay. Nothing is sent here (no dispatcher runs); the stream and sending are
tested with the real service in tests/e2e/test_events.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.settings import Settings
from tests.receiver.test_api import ADMIN, deliver, get
from tests.receiver.test_ledger import T2V_ID, T2V_REF
from tests.support import assert_error, fixture_bytes

ENDPOINT = "https://hooks.example/kling?token=abc"


@pytest.fixture
def client(settings: Settings, ledger_url: str) -> Iterator[TestClient]:
    configured = settings.model_copy(
        update={
            "database_url": ledger_url,
            "event_webhook_urls": ENDPOINT,
            "event_dispatch_concurrency": 0,
        }
    )
    with TestClient(create_app(configured)) as client:
        yield client


def lifecycle(client: TestClient) -> None:
    for name in ("submitted", "processing", "succeed"):
        deliver(
            client, fixture_bytes(f"callback_text2video_{name}.json"), T2V_REF.ref, T2V_REF.action
        )


def events(client: TestClient, query: str = "") -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = get(client, f"/api/events{query}")["events"]
    return found


def test_events_are_listed_newest_first_with_their_bodies(client: TestClient) -> None:
    lifecycle(client)
    listed = events(client)
    assert [e["type"] for e in listed] == ["task.updated"] * 3
    assert [e["seq"] for e in listed] == sorted((e["seq"] for e in listed), reverse=True)
    newest = listed[0]
    assert newest["task_id"] == T2V_ID and newest["msg_id"].startswith("msg_")
    assert newest["payload"]["type"] == "task.updated"
    assert newest["payload"]["data"]["task_id"] == T2V_ID
    assert newest["payload"]["data"]["status"] == "succeed"
    assert [e["payload"]["data"]["status"] for e in listed] == [
        "succeed",
        "processing",
        "submitted",
    ]


def test_the_list_pages_by_cursor_and_filters(client: TestClient) -> None:
    lifecycle(client)
    first = get(client, "/api/events?limit=2")
    assert len(first["events"]) == 2 and first["next_cursor"] is not None
    rest = get(client, f"/api/events?limit=2&cursor={first['next_cursor']}")
    assert len(rest["events"]) == 1 and rest["next_cursor"] is None
    seqs = [e["seq"] for e in first["events"] + rest["events"]]
    assert seqs == sorted(set(seqs), reverse=True)

    assert len(events(client, f"?task_id={T2V_ID}")) == 3
    assert events(client, "?task_id=other") == []
    assert events(client, "?type=asset.stored") == []
    assert len(events(client, "?type=task.updated")) == 3


@pytest.mark.parametrize(
    "query", ["?type=task.bogus", "?limit=0", "?limit=201", "?cursor=abc", "?cursor=-1"]
)
def test_a_bad_query_is_refused(client: TestClient, query: str) -> None:
    assert_error(client.get(f"/api/events{query}", headers=ADMIN), 400, "bad_query")


def test_the_delivery_log_shows_each_endpoint_redacted(client: TestClient) -> None:
    lifecycle(client)
    newest = events(client)[0]
    shown = get(client, f"/api/events/{newest['msg_id']}")
    assert shown["msg_id"] == newest["msg_id"] and shown["payload"] == newest["payload"]
    (delivery,) = shown["deliveries"]
    assert delivery["state"] == "pending" and delivery["attempts"] == 0
    assert delivery["log"] == []
    assert "abc" not in delivery["endpoint"]  # the query's token is not shown
    assert delivery["endpoint"].startswith("https://hooks.example/kling")
    missing = client.get("/api/events/msg_nothing", headers=ADMIN)
    assert_error(missing, 404, "unknown_event")


def test_replay_queues_new_deliveries_of_the_same_events(client: TestClient) -> None:
    lifecycle(client)
    response = client.post("/api/events/replay", json={"since": "1h"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["queued"] == 3
    newest = events(client)[0]
    deliveries = get(client, f"/api/events/{newest['msg_id']}")["deliveries"]
    assert len(deliveries) == 2  # the first one and the replay, same event and msg_id

    narrowed = {"since": "2000-01-01T00:00:00Z", "types": ["asset.stored"], "endpoint": ENDPOINT}
    response = client.post("/api/events/replay", json=narrowed, headers=ADMIN)
    assert response.json()["queued"] == 0
    later = {"since": "2999-01-01T00:00:00+00:00"}
    assert client.post("/api/events/replay", json=later, headers=ADMIN).json()["queued"] == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 422, "bad_since"),
        ({"since": "2026-12-01T00:00:00"}, 422, "bad_since"),  # no zone: which midnight?
        ({"since": "yesterday"}, 422, "bad_since"),
        ({"since": 5}, 422, "bad_since"),
        ({"since": "1h", "types": "task.updated"}, 422, "bad_types"),
        ({"since": "1h", "types": ["task.bogus"]}, 422, "bad_types"),
        ({"since": "1h", "endpoint": "https://elsewhere.example/"}, 422, "unknown_endpoint"),
        ([], 400, "bad_json"),
    ],
)
def test_a_bad_replay_is_refused_and_queues_nothing(
    client: TestClient, body: Any, status: int, code: str
) -> None:
    lifecycle(client)
    response = client.post("/api/events/replay", json=body, headers=ADMIN)
    assert_error(response, status, code)
    newest = events(client)[0]
    assert len(get(client, f"/api/events/{newest['msg_id']}")["deliveries"]) == 1


def test_events_need_the_admin_token(client: TestClient) -> None:
    for path in ("/api/events", "/api/events/stream", "/api/events/msg_x"):
        assert_error(client.get(path), 401, "unauthorized")
    assert_error(client.post("/api/events/replay", json={"since": "1h"}), 401, "unauthorized")
