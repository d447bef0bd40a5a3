"""The read API under /api, and the health endpoints beside it."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from starlette.testclient import TestClient

from receiver import tokens
from receiver.app import create_app
from receiver.settings import Settings
from tests.support import ADMIN_TOKEN, CALLBACK_SECRET, assert_error, fixture_bytes, fixture_json

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TASK_FIELDS = {
    "task_id",
    "action",
    "status",
    "status_msg",
    "external_task_id",
    "created_at",
    "updated_at",
    "kling_updated_at",
    "learned_from",
    "updates",
    "polls",
    "flag",
    "archived",
    "archived_at",
    "assets",
}
ASSET_FIELDS = {
    "kind",
    "index",
    "variant",
    "group_id",
    "url",
    "state",
    "location",
    "sha256",
    "size",
    "content_type",
    "attempts",
    "error",
    "stored_at",
}


@pytest.fixture
def client(settings: Settings, ledger_url: str) -> Iterator[TestClient]:
    """The app on each ledger backend: the API answers the same from SQLite and PostgreSQL."""
    on_backend = settings.model_copy(update={"database_url": ledger_url})
    with TestClient(create_app(on_backend)) as client:
        yield client


def deliver(
    client: TestClient, body: bytes, ref: str | None = None, action: str | None = None
) -> None:
    """POST `body` to a signed callback URL and insist it was accepted."""
    path = tokens.callback_path(CALLBACK_SECRET, ref or tokens.new_channel_ref(), action)
    response = client.post(path, content=body)
    assert response.status_code == 200, response.text


def task_body(task_id: str, status: str = "submitted", **fields: Any) -> bytes:
    return json.dumps({"task_id": task_id, "task_status": status, **fields}).encode()


def get(client: TestClient, path: str) -> Any:
    response = client.get(path, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def is_utc_timestamp(text: str) -> bool:
    return text.endswith("Z") and datetime.fromisoformat(text).utcoffset() is not None


# -- authentication ------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer not-the-admin-token",
        f"Bearer {ADMIN_TOKEN}x",
        f"Bearer {CALLBACK_SECRET}",
        "Basic " + base64.b64encode(f"admin:{ADMIN_TOKEN}".encode()).decode(),
        ADMIN_TOKEN,
    ],
    ids=["missing", "wrong", "longer", "callback-secret", "basic", "no-scheme"],
)
@pytest.mark.parametrize(
    "path", ["/api/tasks", "/api/tasks/T1", "/api/tasks/T1/events", "/api/stats", "/api/nope"]
)
def test_api_requires_admin_bearer_token(
    client: TestClient, authorization: str | None, path: str
) -> None:
    """Without `Authorization: Bearer ADMIN_TOKEN`, every /api URL answers 401 with a challenge."""
    deliver(client, task_body("T1"))
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.get(path, headers=headers)
    assert_error(response, 401, "unauthorized", "ADMIN_TOKEN", "Bearer")
    assert response.headers["www-authenticate"] == "Bearer"
    assert "T1" not in response.text


def test_api_answers_with_admin_token(client: TestClient) -> None:
    """With the right bearer token the API answers."""
    assert get(client, "/api/tasks") == {"tasks": [], "next_cursor": None}


def test_auth_scheme_is_case_insensitive(client: TestClient) -> None:
    """`bearer` and `BEARER` name the same scheme as `Bearer`."""
    for scheme in ("bearer", "BEARER"):
        headers = {"Authorization": f"{scheme} {ADMIN_TOKEN}"}
        assert client.get("/api/tasks", headers=headers).status_code == 200


# -- one task ----------------------------------------------------------------------


def test_task_before_it_ends(client: TestClient) -> None:
    """A task that has only been submitted shows its status, no files and no terminal source."""
    deliver(
        client,
        fixture_bytes("callback_text2video_submitted.json"),
        tokens.task_ref("kr_01JDX3N5Q8"),
        "videos/text2video",
    )

    task = get(client, "/api/tasks/867283741759111202")

    assert set(task) == TASK_FIELDS
    assert task["task_id"] == "867283741759111202"
    assert task["action"] == "videos/text2video"
    assert task["status"] == "submitted"
    assert task["status_msg"] == ""
    assert task["external_task_id"] == "kr_01JDX3N5Q8"
    assert task["kling_updated_at"] == 1764043200000
    assert task["learned_from"] is None
    assert task["updates"] == 1
    assert task["archived"] is False
    assert task["archived_at"] is None
    assert task["assets"] == []
    assert is_utc_timestamp(task["created_at"])
    assert task["updated_at"] == task["created_at"]


def test_succeeded_task_lists_its_files(client: TestClient) -> None:
    """A succeeded task says it learned so from a callback and lists each file, not yet stored."""
    ref = tokens.task_ref("kr_01JDX3Q1BB")
    deliver(client, task_body("CjMT7WdSwWcAAAAAALvB3g", "processing"), ref, "images/generations")
    first = get(client, "/api/tasks/CjMT7WdSwWcAAAAAALvB3g")
    deliver(client, fixture_bytes("callback_images_generations_succeed.json"), ref)

    task = get(client, "/api/tasks/CjMT7WdSwWcAAAAAALvB3g")

    payload = fixture_json("callback_images_generations_succeed.json")
    assert task["status"] == "succeed"
    assert task["learned_from"] == "callback"
    assert task["action"] == "images/generations"
    assert task["updates"] == 2
    assert task["kling_updated_at"] == payload["updated_at"]
    assert task["archived"] is False
    assert task["created_at"] == first["created_at"]
    assert is_utc_timestamp(task["updated_at"])
    assert task["updated_at"] >= first["updated_at"]
    assert all(set(asset) == ASSET_FIELDS for asset in task["assets"])
    assert task["assets"] == [
        {
            "kind": "image",
            "index": image["index"],
            "variant": "",
            "group_id": None,
            "url": image["url"],
            "state": "pending",
            "location": None,
            "sha256": None,
            "size": None,
            "content_type": None,
            "attempts": 0,
            "error": None,
            "stored_at": None,
        }
        for image in payload["task_result"]["images"]
    ]


def test_failed_task_keeps_the_reason(client: TestClient) -> None:
    """A failed task shows Kling's reason and that a callback told us."""
    deliver(client, fixture_bytes("callback_text2video_failed.json"))
    task = get(client, "/api/tasks/867283741759111203")
    assert task["status"] == "failed"
    assert task["status_msg"] == "Failure to pass the risk control system"
    assert task["learned_from"] == "callback"
    assert task["assets"] == []


def test_task_id_with_url_special_characters(client: TestClient) -> None:
    """A base64-like task id with `+` and `=` is found under its own path."""
    deliver(client, task_body("CjMT7W+dS=="))
    assert get(client, "/api/tasks/CjMT7W+dS==")["task_id"] == "CjMT7W+dS=="


def test_unknown_task_is_not_found(client: TestClient) -> None:
    """Asking for a task that was never recorded answers 404 naming it."""
    response = client.get("/api/tasks/867283741759999999", headers=ADMIN)
    assert_error(response, 404, "unknown_task", "867283741759999999")


# -- the task list -------------------------------------------------------------------


@pytest.mark.parametrize(("count", "pages"), [(7, [3, 3, 1]), (6, [3, 3]), (2, [2])])
def test_task_list_pages_through_every_task_newest_first(
    client: TestClient, count: int, pages: list[int]
) -> None:
    """Following next_cursor lists every task once, newest first, and ends with a null cursor."""
    created = [f"task-{n}" for n in range(count)]
    for task_id in created:
        deliver(client, task_body(task_id))

    seen, sizes, cursor = [], [], None
    while True:
        query = "/api/tasks?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = get(client, query)
        seen += [task["task_id"] for task in page["tasks"]]
        sizes.append(len(page["tasks"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == created[::-1]
    assert sizes == pages


def test_task_list_items_are_whole_tasks(client: TestClient) -> None:
    """Each item of the list carries the same fields as GET /api/tasks/{id}."""
    deliver(client, fixture_bytes("callback_text2video_succeed.json"))
    [item] = get(client, "/api/tasks")["tasks"]
    assert item == get(client, "/api/tasks/867283741759111202")


STATUSES = {"t-sub": "submitted", "t-proc": "processing", "t-ok": "succeed", "t-fail": "failed"}


@pytest.mark.parametrize("status", ["submitted", "processing", "succeed", "failed"])
def test_task_list_filters_by_status(client: TestClient, status: str) -> None:
    """`status=` lists only the tasks in that status."""
    for task_id, task_status in STATUSES.items():
        deliver(client, task_body(task_id, task_status))
    deliver(client, task_body("t-ok-2", "succeed"))

    tasks = get(client, f"/api/tasks?status={status}")["tasks"]

    wanted = [t for t, s in [*STATUSES.items(), ("t-ok-2", "succeed")] if s == status][::-1]
    assert [task["task_id"] for task in tasks] == wanted
    assert {task["status"] for task in tasks} == {status}


def test_status_filter_pages_too(client: TestClient) -> None:
    """Paging with a status filter walks only the matching tasks."""
    for n in range(5):
        deliver(client, task_body(f"s-{n}", "submitted"))
        deliver(client, task_body(f"p-{n}", "processing"))

    first = get(client, "/api/tasks?status=processing&limit=3")
    second = get(client, f"/api/tasks?status=processing&limit=3&cursor={first['next_cursor']}")

    ids = [task["task_id"] for task in first["tasks"] + second["tasks"]]
    assert ids == [f"p-{n}" for n in reversed(range(5))]
    assert second["next_cursor"] is None


def test_task_list_filters_by_archived(client: TestClient) -> None:
    """`archived=false` lists tasks not yet archived; `archived=true` leaves them out."""
    deliver(client, fixture_bytes("callback_text2video_succeed.json"))
    deliver(client, task_body("T2"))

    not_archived = get(client, "/api/tasks?archived=false")["tasks"]
    archived = get(client, "/api/tasks?archived=true")["tasks"]

    assert [task["task_id"] for task in not_archived] == ["T2", "867283741759111202"]
    assert archived == []


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("status=queued", "status"),
        ("status=SUCCEED", "status"),
        ("archived=yes", "archived"),
        ("archived=1", "archived"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("limit=2.5", "limit"),
        ("limit=%C2%B2", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        (f"cursor={_cursor('id:x')}", "cursor"),
        (f"cursor={_cursor('id:' + '9' * 30)}", "cursor"),
        (f"cursor={_cursor('id:-3')}", "cursor"),
    ],
    ids=[
        "unknown-status",
        "status-case",
        "archived-yes",
        "archived-1",
        "limit-0",
        "limit-201",
        "limit-negative",
        "limit-word",
        "limit-fraction",
        "limit-superscript",
        "cursor-garbage",
        "cursor-not-a-number",
        "cursor-huge",
        "cursor-negative",
    ],
)
def test_bad_query_is_refused(client: TestClient, query: str, words: str) -> None:
    """A task-list query with a value it cannot use answers 400 naming the parameter."""
    deliver(client, task_body("T1"))
    response = client.get(f"/api/tasks?{query}", headers=ADMIN)
    assert_error(response, 400, "bad_query", words)


# -- events ------------------------------------------------------------------------


def test_events_are_listed_oldest_first_verbatim(client: TestClient) -> None:
    """A task's deliveries are listed in the order received, each body exactly as sent."""
    ref = tokens.new_channel_ref()
    processing = (
        b'{ "task_id":"T1",\n  "task_status":"processing",'
        b' "task_status_msg":"\xe2\x9c\x93 \xd0\xb8\xd0\xb4\xd1\x91\xd1\x82",  "updated_at": 2 }'
    )
    submitted = b'{"task_id": "T1", "task_status": "submitted", "updated_at": 1}'
    succeed = json.dumps(
        {"task_id": "T1", "task_status": "succeed", "updated_at": 3}, indent=4
    ).encode()
    for body in (processing, submitted, succeed, processing):
        deliver(client, body, ref)

    page = get(client, "/api/tasks/T1/events")

    assert page["task_id"] == "T1"
    events = page["events"]
    assert [event["body"].encode() for event in events] == [processing, submitted, succeed]
    assert [event["status"] for event in events] == ["processing", "submitted", "succeed"]
    assert [event["applied"] for event in events] == [True, False, True]
    assert [event["times_received"] for event in events] == [2, 1, 1]
    assert [event["source"] for event in events] == ["callback"] * 3
    ids = [event["id"] for event in events]
    assert ids == sorted(ids)
    received = [event["received_at"] for event in events]
    assert received == sorted(received)
    assert events[0]["last_received_at"] >= events[2]["received_at"]
    assert all(is_utc_timestamp(event["received_at"]) for event in events)


def test_events_of_unknown_task_are_not_found(client: TestClient) -> None:
    """Asking for the events of a task that was never recorded answers 404 naming it."""
    response = client.get("/api/tasks/nobody/events", headers=ADMIN)
    assert_error(response, 404, "unknown_task", "nobody")


# -- outside /api ----------------------------------------------------------------------


def test_health_needs_no_token(client: TestClient) -> None:
    """/healthz answers 200 to anyone."""
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readiness_needs_no_token(client: TestClient) -> None:
    """/readyz answers 200 to anyone once the database answers."""
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


@pytest.mark.parametrize(
    ("path", "headers"),
    [("/nope", {}), ("/api/nope", ADMIN), ("/api/tasks/T1/assets", ADMIN)],
)
def test_unknown_path_is_json_404(client: TestClient, path: str, headers: dict[str, str]) -> None:
    """A URL the service does not have answers 404 in JSON."""
    response = client.get(path, headers=headers)
    assert_error(response, 404, "not_found")
