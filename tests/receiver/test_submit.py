"""Submitting through POST /api/tasks, in process, against a fake Kling API on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from starlette.testclient import TestClient

from receiver import tokens
from receiver.app import create_app
from receiver.settings import Settings
from receiver.submit import MAX_PROMPT, SubmitError, check_params, create_body
from tests.fake_kling import FakeKling
from tests.support import (
    ADMIN_TOKEN,
    KLING_API_KEY,
    app_settings,
    fixture_json,
    free_port,
)

T2V = "videos/text2video"
LIP_SYNC = "videos/lip-sync"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GOOD = {"prompt": "a red fox in the snow", "duration": "5", "mode": "std"}

App = Callable[..., TestClient]


def kling_settings(tmp_path: Path, base: str) -> Settings:
    """The test settings, with Kling credentials for the API at `base` and instant retries."""
    return app_settings(
        tmp_path, kling_api_base=base, kling_api_key=KLING_API_KEY, kling_retry_base_seconds=0.01
    )


@pytest.fixture
def app(tmp_path: Path, kling: FakeKling, ledger_url: str) -> Iterator[App]:
    """Start the app against the fake Kling (or `base`), on each ledger backend; stopped at
    the end of the test."""
    opened: list[TestClient] = []

    def start(base: str | None = None) -> TestClient:
        made = kling_settings(tmp_path, base or kling.base_url)
        made = made.model_copy(update={"database_url": ledger_url})
        client = TestClient(create_app(made))
        client.__enter__()
        opened.append(client)
        return client

    yield start
    for client in opened:
        client.__exit__(None, None, None)


def post(
    client: TestClient, params: Any, action: Any = T2V, key: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = ADMIN | ({"Idempotency-Key": key} if key else {})
    response = client.post("/api/tasks", json={"action": action, "params": params}, headers=headers)
    body: dict[str, Any] = response.json()
    return response.status_code, body


def in_app(client: TestClient, method: str, *args: Any) -> Any:
    """Call a method of the running app's ledger, on the app's own event loop."""
    assert client.portal is not None
    return client.portal.call(getattr(client.app.state.ledger, method), *args)  # type: ignore[attr-defined]


def listed(client: TestClient) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = client.get("/api/tasks", headers=ADMIN).json()["tasks"]
    return tasks


def test_a_submission_carries_its_own_callback_url_and_external_task_id(
    app: App, kling: FakeKling
) -> None:
    """Kling gets the params plus a signed per-task callback URL and a `kr-` external_task_id."""
    client = app()
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    status, task = post(client, GOOD)

    assert status == 201, task
    (create,) = kling.creates()
    assert create.path == "/kling/v1/videos/text2video"
    assert create.headers["authorization"] == f"Bearer {KLING_API_KEY}"
    sent = dict(create.body)
    external, callback_url = sent.pop("external_task_id"), sent.pop("callback_url")
    assert sent == GOOD
    assert external.startswith("kr-") and len(external) > 20
    assert callback_url.startswith(settings.public_url + tokens.CALLBACK_PREFIX + "/")
    ref, sig, *action = urlsplit(callback_url).path.split("/")[3:]
    assert tokens.verify(settings.secret("callback_secret"), ref, sig, "/".join(action)) == (
        tokens.CallbackRef(f"x-{external}", T2V)
    )
    fake_task = kling.by_external(external)
    assert task["task_id"] == fake_task.task_id
    assert (task["status"], task["external_task_id"], task["action"]) == (
        "submitted",
        external,
        T2V,
    )
    assert [t["task_id"] for t in listed(client)] == [fake_task.task_id]


def test_the_callback_url_given_at_submission_is_accepted_for_that_task(
    app: App, kling: FakeKling
) -> None:
    """Kling's first callback through the URL it was given moves the submitted task."""
    client = app()
    _, task = post(client, GOOD)
    fake_task = kling.advance(task["task_id"])
    assert fake_task.callback_url is not None

    delivered = client.post(urlsplit(fake_task.callback_url).path, json=fake_task.as_json())

    assert delivered.json()["outcome"] == "moved"
    assert client.get(f"/api/tasks/{task['task_id']}", headers=ADMIN).json()["status"] == (
        "processing"
    )


def test_concurrency_refusals_are_retried_and_the_task_is_submitted_once(
    app: App, kling: FakeKling
) -> None:
    """1303 twice, then success: three identical requests, one task at Kling and here."""
    kling.fail_creates(1303, 1303)
    client = app()
    status, task = post(client, GOOD)

    assert status == 201, task
    attempts = kling.creates()
    assert len(attempts) == 3
    assert kling.creates(task["external_task_id"]) == attempts
    assert len(kling.tasks) == 1
    assert [t["task_id"] for t in listed(client)] == [task["task_id"]] == list(kling.tasks)


def test_a_refusal_is_a_4xx_with_klings_code_and_leaves_nothing_pending(
    app: App, kling: FakeKling
) -> None:
    """1201: 400 with kling_code and Kling's message; the submission is marked refused."""
    kling.always_fail(1201)
    client = app()
    status, body = post(client, GOOD, key="refused-1")

    assert status == 400
    assert body["error"] == "kling_refused"
    assert body["kling_code"] == 1201
    assert "duration: must be one of [5, 10]" in body["message"]
    assert body["request_id"]
    assert listed(client) == []
    (create,) = kling.creates()
    submission = in_app(client, "submission", create.body["external_task_id"])
    assert submission.state == "refused"
    assert in_app(client, "claim_stale_submissions", 0.0, 60.0) == []
    # The same key again says what happened rather than submitting again.
    again, replay = post(client, GOOD, key="refused-1")
    assert (again, replay["error"]) == (422, "submission_failed")
    assert "1201" in replay["message"]
    assert len(kling.creates()) == 1


def test_a_concurrency_limit_that_never_lifts_is_a_429_with_klings_code(
    app: App, kling: FakeKling
) -> None:
    """1303 after every retry: 429 with kling_code 1303, and no task."""
    kling.always_fail(1303)
    client = app()
    status, body = post(client, GOOD)
    assert (status, body["kling_code"]) == (429, 1303)
    assert len(kling.creates()) == 5
    assert listed(client) == []


def test_the_same_idempotency_key_returns_the_same_task(app: App, kling: FakeKling) -> None:
    """Twice with one key: 201 then 200, the same task, one create at Kling."""
    client = app()
    first_status, first = post(client, GOOD, key="order-42")
    second_status, second = post(client, GOOD, key="order-42")

    assert (first_status, second_status) == (201, 200)
    assert first["task_id"] == second["task_id"]
    assert len(kling.creates()) == 1 and len(kling.tasks) == 1
    assert len(listed(client)) == 1


def test_the_same_idempotency_key_with_other_params_is_refused(app: App, kling: FakeKling) -> None:
    """A key reused for a different submission is 422, and nothing more is sent."""
    client = app()
    post(client, GOOD, key="order-43")
    status, body = post(client, GOOD | {"prompt": "another fox"}, key="order-43")

    assert (status, body["error"]) == (422, "idempotency_key_reused")
    status, body = post(client, GOOD, action="videos/image2video", key="order-43")
    assert (status, body["error"]) == (422, "idempotency_key_reused")
    assert len(kling.creates()) == 1


def test_a_submission_kling_did_not_answer_stays_pending_for_reconciliation(app: App) -> None:
    """No answer: 504, the submission is kept pending, and a replay with the key says so."""
    client = app(base=f"http://127.0.0.1:{free_port()}/kling")
    status, body = post(client, GOOD, key="order-44")

    assert (status, body["error"]) == (504, "kling_unavailable")
    assert "reconciled" in body["message"]
    (pending,) = in_app(client, "claim_stale_submissions", 0.0, 60.0)
    assert (pending.state, pending.action, pending.params) == ("pending", T2V, GOOD)
    assert pending.external_task_id in body["message"]
    again, replay = post(client, GOOD, key="order-44")
    assert (again, replay["error"]) == (409, "submission_in_progress")


@pytest.mark.parametrize(
    ("action", "params", "word"),
    [
        (T2V, GOOD | {"prompt": "x" * (MAX_PROMPT + 1)}, "prompt"),
        (T2V, GOOD | {"negative_prompt": "x" * (MAX_PROMPT + 1)}, "negative_prompt"),
        (T2V, GOOD | {"prompt": 42}, "prompt"),
        (T2V, GOOD | {"duration": 5}, "duration"),
        (T2V, GOOD | {"duration": "five"}, "duration"),
        (T2V, GOOD | {"duration": "5.0"}, "duration"),
        (T2V, GOOD | {"mode": "turbo"}, "mode"),
        (T2V, GOOD | {"callback_url": "https://elsewhere.example/hook"}, "callback_url"),
        (T2V, GOOD | {"external_task_id": "mine-1"}, "external_task_id"),
        (LIP_SYNC, {"input": {"video_id": "v1", "mode": "turbo"}}, "mode"),
        (LIP_SYNC, {"input": {"text": "hi", "duration": 5}}, "duration"),
        (T2V, ["prompt", "a fox"], "params"),
        (T2V, None, "params"),
        ("text2video", GOOD, "action"),
        ("videos/../../admin", GOOD, "action"),
        (None, GOOD, "action"),
    ],
    ids=[
        "prompt-2501",
        "negative-prompt-2501",
        "prompt-not-text",
        "duration-number",
        "duration-word",
        "duration-decimal",
        "mode-turbo",
        "callback-url",
        "external-task-id",
        "nested-mode",
        "nested-duration",
        "params-array",
        "params-missing",
        "action-one-part",
        "action-traversal",
        "action-missing",
    ],
)
def test_bad_params_are_refused_before_kling_is_called(
    app: App, kling: FakeKling, action: Any, params: Any, word: str
) -> None:
    """A mistake worth catching is a 422 naming the field, and no slot is spent at Kling."""
    client = app()
    status, body = post(client, params, action=action)

    assert (status, body["error"]) == (422, "bad_params"), body
    assert word in body["message"]
    assert kling.requests == []
    assert listed(client) == []


def test_params_at_the_limits_are_accepted() -> None:
    """A 2500-character prompt, a digit-string duration and mode pro pass the checks."""
    params = {"prompt": "x" * MAX_PROMPT, "duration": "10", "mode": "pro", "cfg_scale": 0.5}
    assert check_params(T2V, params) == (T2V, params)
    nested = {"input": {"video_id": "v", "mode": "std", "duration": "5"}}
    assert check_params(LIP_SYNC, nested) == (LIP_SYNC, nested)


def test_a_refusal_carries_what_a_caller_needs() -> None:
    """SubmitError's JSON names the error, the sentence, and Kling's code and request id."""
    body = fixture_json("error_1201_params.json")
    error = SubmitError(400, "kling_refused", "Refused.", body["code"], body["request_id"])
    assert error.as_json() == {
        "error": "kling_refused",
        "message": "Refused.",
        "kling_code": 1201,
        "request_id": body["request_id"],
    }
    assert SubmitError(422, "bad_params", "No.").as_json() == {
        "error": "bad_params",
        "message": "No.",
    }


def test_submitting_without_kling_credentials_is_503(settings: Settings) -> None:
    """Without KLING_API_KEY the service says what to set rather than failing obscurely."""
    with TestClient(create_app(settings)) as client:
        status, body = post(client, GOOD)
    assert (status, body["error"]) == (503, "kling_not_configured")
    assert "KLING_API_KEY" in body["message"]


def test_kling_trouble_that_outlasts_the_retries_leaves_the_submission_to_reconcile(
    app: App, kling: FakeKling
) -> None:
    """5001 after every retry: a 504 saying it will be reconciled; the submission stays pending."""
    kling.always_fail(5001)
    client = app()
    status, body = post(client, GOOD, key="busy-1")
    assert (status, body["error"]) == (504, "kling_unavailable")
    assert "reconciled" in body["message"]
    again, replay = post(client, GOOD, key="busy-1")
    assert (again, replay["error"]) == (409, "submission_in_progress")
    assert len(kling.creates()) == 5


# -- the current standard: `settings` and `options`, durations as integers ------------------

T26 = "text-to-video/kling-2.6"
GOOD_NEW = {
    "prompt": "a red fox in the snow",
    "settings": {"duration": 5, "aspect_ratio": "16:9"},
    "options": {"watermark_info": {"enabled": False}},
}


@pytest.mark.parametrize(
    ("params", "sentence"),
    [
        (GOOD_NEW | {"settings": {"duration": "5"}}, "settings.duration must be an integer"),
        (GOOD_NEW | {"settings": {"duration": True}}, "settings.duration must be an integer"),
        (GOOD_NEW | {"settings": {"duration": 5.0}}, "settings.duration must be an integer"),
        (
            GOOD_NEW | {"options": {"callback_url": "https://elsewhere.example/hook"}},
            "options.callback_url is set by the service",
        ),
        (
            GOOD_NEW | {"options": {"external_task_id": "mine-1"}},
            "options.external_task_id is set by the service",
        ),
        (
            GOOD_NEW | {"callback_url": "https://elsewhere.example/hook"},
            "callback_url is set by the service",
        ),
        (GOOD_NEW | {"external_task_id": "mine-1"}, "external_task_id is set by the service"),
        (GOOD_NEW | {"options": "watermark"}, "options must be a JSON object"),
        (GOOD_NEW | {"settings": [5]}, "settings must be a JSON object"),
        (GOOD_NEW | {"prompt": "x" * (MAX_PROMPT + 1)}, "prompt must be text"),
    ],
    ids=[
        "duration-text",
        "duration-bool",
        "duration-float",
        "options-callback-url",
        "options-external-task-id",
        "top-callback-url",
        "top-external-task-id",
        "options-not-object",
        "settings-not-object",
        "prompt-2501",
    ],
)
def test_current_standard_params_are_checked_in_their_own_shape(
    params: dict[str, Any], sentence: str
) -> None:
    """The new standard nests fields in settings/options and wants an int duration."""
    with pytest.raises(SubmitError) as refused:
        check_params(T26, params)
    assert (refused.value.status_code, refused.value.code) == (422, "bad_params")
    assert sentence in refused.value.message


def test_each_standard_takes_the_duration_in_its_own_type() -> None:
    """An int is right for settings.duration and wrong for the old top-level duration."""
    assert check_params(T26, GOOD_NEW) == (T26, GOOD_NEW)
    assert check_params(T26, {"prompt": "p"}) == (T26, {"prompt": "p"})
    assert check_params(T2V, GOOD) == (T2V, GOOD)
    with pytest.raises(SubmitError, match="string of digits"):
        check_params(T2V, GOOD | {"duration": 5})


def test_the_create_body_puts_our_fields_where_each_standard_wants_them() -> None:
    """Options (new) keep the caller's own entries; the old standard takes them at the top."""
    ours = ("https://receiver.example/cb/x", "kr-1")
    assert create_body(T26, GOOD_NEW, *ours) == {
        "prompt": "a red fox in the snow",
        "settings": {"duration": 5, "aspect_ratio": "16:9"},
        "options": {
            "watermark_info": {"enabled": False},
            "callback_url": "https://receiver.example/cb/x",
            "external_task_id": "kr-1",
        },
    }
    assert GOOD_NEW["options"] == {"watermark_info": {"enabled": False}}  # not mutated
    assert create_body(T26, {"prompt": "p"}, *ours) == {
        "prompt": "p",
        "options": {"callback_url": "https://receiver.example/cb/x", "external_task_id": "kr-1"},
    }
    assert create_body(T2V, GOOD, *ours) == GOOD | {
        "callback_url": "https://receiver.example/cb/x",
        "external_task_id": "kr-1",
    }


def test_a_current_standard_submission_goes_to_the_model_path_with_options(
    app: App, kling: FakeKling
) -> None:
    """Kling gets `POST {base}/text-to-video/kling-2.6` with our URL and id under options."""
    client = app()
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    status, task = post(client, GOOD_NEW, action=T26)

    assert status == 201, task
    (create,) = kling.creates()
    assert create.path == "/kling/text-to-video/kling-2.6"
    sent = dict(create.body)
    options = dict(sent.pop("options"))
    external, callback_url = options.pop("external_task_id"), options.pop("callback_url")
    assert sent == {k: v for k, v in GOOD_NEW.items() if k != "options"}
    assert options == GOOD_NEW["options"]
    assert external.startswith("kr-")
    ref, sig, *action = urlsplit(callback_url).path.split("/")[3:]
    assert tokens.verify(settings.secret("callback_secret"), ref, sig, "/".join(action)) == (
        tokens.CallbackRef(f"x-{external}", T26)
    )
    fake_task = kling.by_external(external)
    assert fake_task.callback_url == callback_url
    assert (task["task_id"], task["status"], task["external_task_id"], task["action"]) == (
        fake_task.task_id,
        "submitted",
        external,
        T26,
    )
    assert [t["task_id"] for t in listed(client)] == [fake_task.task_id]
