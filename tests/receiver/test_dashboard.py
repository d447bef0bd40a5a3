"""The dashboard in-process: sign-in and sessions, CSRF, the security headers, and each page
with its filters and actions (on both ledger backends where the page reads the ledger)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from receiver import tokens
from receiver._clock import utc_now
from receiver.app import create_app
from receiver.dashboard.session import SESSION_COOKIE, Sessions
from receiver.ledger import AssetResult, Ledger
from receiver.models import AssetState
from receiver.settings import Settings
from tests.media_server import media_bytes
from tests.support import ADMIN_TOKEN, CALLBACK_SECRET

PAGES = ["/", "/tasks", "/tasks/t1", "/failures", "/events", "/events/msg_x"]
ACTIONS = ["/tasks/t1/retry", "/failures/retry", "/events/replay", "/signout"]


@pytest.fixture
def app_client(settings: Settings) -> Iterator[TestClient]:
    """The app on SQLite, signed out."""
    with TestClient(create_app(settings), follow_redirects=False) as client:
        yield client


@pytest.fixture
def client(settings: Settings, ledger_url: str) -> Iterator[TestClient]:
    """The app on each ledger backend, signed in."""
    on_backend = settings.model_copy(update={"database_url": ledger_url})
    with TestClient(create_app(on_backend), follow_redirects=False) as client:
        sign_in(client)
        yield client


def form_csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def sign_in(client: TestClient, token: str = ADMIN_TOKEN, next_path: str = "/") -> Any:
    page = client.get("/signin")
    assert page.status_code == 200
    return client.post(
        "/signin", data={"csrf": form_csrf(page.text), "token": token, "next": next_path}
    )


def csrf_of(client: TestClient) -> str:
    return form_csrf(client.get("/").text)


def deliver(client: TestClient, body: dict[str, Any], action: str = "videos/text2video") -> None:
    path = tokens.callback_path(CALLBACK_SECRET, tokens.new_channel_ref(), action)
    response = client.post(path, content=json.dumps(body).encode())
    assert response.status_code == 200, response.text


def task(task_id: str, status: str = "submitted", **fields: Any) -> dict[str, Any]:
    return {"task_id": task_id, "task_status": status, "task_status_msg": "", **fields}


def succeed(task_id: str, urls: list[str], **fields: Any) -> dict[str, Any]:
    videos = [{"id": f"{task_id}_{n}", "url": url} for n, url in enumerate(urls)]
    return task(task_id, "succeed", task_result={"videos": videos}, **fields)


def ledger_of(client: TestClient) -> Ledger:
    ledger: Ledger = client.app.state.ledger  # type: ignore[attr-defined]
    return ledger


def settle_next(client: TestClient, result: AssetResult) -> str:
    """Claim the next download job and settle it as `result`; the job's task id."""
    ledger = ledger_of(client)
    assert client.portal is not None
    job = client.portal.call(ledger.claim_asset, "test", 30)
    assert job is not None
    assert client.portal.call(ledger.settle_asset, job.asset_id, "test", result)
    return job.task_id


# -- signing in ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_pages_redirect_to_the_sign_in_form_without_a_session(
    app_client: TestClient, path: str
) -> None:
    response = app_client.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == "/signin?" + urlencode({"next": path})


def test_signing_in_returns_to_the_page_asked_for(app_client: TestClient) -> None:
    asked = app_client.get("/tasks", params={"status": "failed", "q": "a b"})
    after = parse_qs(urlsplit(asked.headers["location"]).query)["next"][0]
    assert after == "/tasks?status=failed&q=a+b"
    response = sign_in(app_client, next_path=after)
    assert response.headers["location"] == after


@pytest.mark.parametrize("path", ACTIONS)
def test_forms_are_refused_without_a_session(app_client: TestClient, path: str) -> None:
    response = app_client.post(path, data={"csrf": "x", "task_id": "t1"})
    assert response.status_code == 401
    assert "Sign in with the admin token" in response.text


def test_the_live_stream_is_refused_without_a_session(app_client: TestClient) -> None:
    assert app_client.get("/live").status_code == 401


def test_a_bearer_token_is_no_session(app_client: TestClient) -> None:
    """The dashboard takes its cookie only; /api keeps its Bearer token and ignores cookies."""
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert app_client.get("/tasks", headers=bearer).status_code == 303
    sign_in(app_client)
    assert app_client.get("/api/tasks").status_code == 401
    assert app_client.get("/api/tasks", headers=bearer).status_code == 200


def test_the_probes_and_the_api_are_not_shadowed(app_client: TestClient) -> None:
    assert app_client.get("/healthz").json() == {"status": "ok"}
    assert app_client.get("/readyz").status_code == 200
    assert app_client.get("/metrics").status_code == 401
    assert app_client.get("/api/tasks").status_code == 401
    script = app_client.get("/static/dashboard.js")  # no data in it: public, like the form
    assert script.status_code == 200 and "EventSource" in script.text


def test_a_wrong_token_gets_a_clear_message_and_no_session(app_client: TestClient) -> None:
    response = sign_in(app_client, token="not-the-token")
    assert response.status_code == 401
    assert "That is not the admin token (ADMIN_TOKEN)." in response.text
    assert SESSION_COOKIE not in response.cookies
    assert app_client.get("/").status_code == 303


def test_signing_in_sets_a_strict_http_only_session_cookie(app_client: TestClient) -> None:
    response = sign_in(app_client, next_path="/failures")
    assert response.status_code == 303
    assert response.headers["location"] == "/failures"
    cookie = next(
        value
        for value in response.headers.get_list("set-cookie")
        if value.startswith(SESSION_COOKIE + "=")
    )
    attributes = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    assert "secure" not in attributes  # PUBLIC_URL is http here
    page = app_client.get("/failures")
    assert page.status_code == 200 and "Files failed or waiting" in page.text


def test_the_cookie_is_secure_behind_https(settings: Settings) -> None:
    behind_tls = settings.model_copy(update={"public_url": "https://media.example.com"})
    with TestClient(create_app(behind_tls), base_url="https://testserver") as client:
        response = client.post(
            "/signin",
            data={"csrf": form_csrf(client.get("/signin").text), "token": ADMIN_TOKEN},
            follow_redirects=False,
        )
        assert response.status_code == 303
        cookies = response.headers.get_list("set-cookie")
        assert any(c.startswith(SESSION_COOKIE) and "Secure" in c for c in cookies), cookies


def test_the_sign_in_form_needs_its_csrf_token(app_client: TestClient) -> None:
    app_client.get("/signin")
    response = app_client.post("/signin", data={"csrf": "forged", "token": ADMIN_TOKEN})
    assert response.status_code == 401
    assert "The form expired" in response.text
    assert SESSION_COOKIE not in response.cookies


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:x"]
)
def test_signing_in_never_sends_elsewhere(app_client: TestClient, target: str) -> None:
    response = sign_in(app_client, next_path=target)
    assert response.status_code == 303
    assert response.headers["location"] == "/"


def test_a_tampered_or_expired_session_is_refused(app_client: TestClient) -> None:
    sessions = Sessions(ADMIN_TOKEN, secure=False)
    expired = sessions.issue("session", 60, now=0)
    valid = sessions.issue("session", 60)
    expires, nonce, signature = valid.split(".")
    tampered = f"{int(expires) + 10**6}.{nonce}.{signature}"
    for value in (expired, tampered, valid + "0", "a.b.c", ""):
        app_client.cookies.set(SESSION_COOKIE, value)
        assert app_client.get("/").status_code == 303, value
    app_client.cookies.set(SESSION_COOKIE, valid)
    assert app_client.get("/").status_code == 200


def test_rotating_the_admin_token_signs_everyone_out(settings: Settings) -> None:
    with TestClient(create_app(settings), follow_redirects=False) as client:
        sign_in(client)
        cookie = client.cookies[SESSION_COOKIE]
    rotated = settings.model_copy(
        update={"admin_token": SecretStr("another-admin-token-0123456789abcdef")}
    )
    with TestClient(create_app(rotated), follow_redirects=False) as client:
        client.cookies.set(SESSION_COOKIE, cookie)
        assert client.get("/").status_code == 303


def test_a_session_cookie_is_not_a_form_token(app_client: TestClient) -> None:
    """The CSRF token is an HMAC of the session's nonce under its own purpose."""
    sessions = Sessions(ADMIN_TOKEN, secure=False)
    value = sessions.issue("session", 60)
    nonce = sessions.open("session", value)
    assert nonce is not None
    assert sessions.csrf_ok(nonce, sessions.csrf(nonce))
    assert not sessions.csrf_ok(nonce, value)
    assert sessions.open("signin", value) is None  # a sign-in cookie is no session either


# -- CSRF and headers ---------------------------------------------------------------------


def test_forms_without_the_sessions_csrf_token_are_refused(client: TestClient) -> None:
    deliver(client, succeed("t1", ["https://cdn.example/a.mp4"]))
    settle_next(client, AssetResult(AssetState.failed, error="gone"))
    for forged in ({}, {"csrf": "0" * 64}, {"csrf": Sessions("other", secure=False).csrf("n")}):
        response = client.post("/tasks/t1/retry", data=forged)
        assert response.status_code == 403
        assert "This form is stale" in response.text
    assert client.portal is not None
    found = client.portal.call(ledger_of(client).task, "t1")
    assert found is not None and found.assets[0].state is AssetState.failed


def test_every_page_has_a_strict_content_security_policy(client: TestClient) -> None:
    for path in ["/", "/tasks", "/failures", "/events", "/signin"]:
        response = client.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "default-src 'none'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert "frame-ancestors 'none'" in policy
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "<script>" not in response.text  # only the static file's <script src=...>


def test_signing_out_ends_the_session(client: TestClient) -> None:
    response = client.post("/signout", data={"csrf": csrf_of(client)})
    assert response.status_code == 303
    assert client.get("/").status_code == 303


# -- pages ---------------------------------------------------------------------------------


def test_overview_counts_statuses_sources_backlog_and_storage(client: TestClient) -> None:
    deliver(client, task("s1"))
    deliver(client, task("p1", "processing"))
    deliver(client, succeed("v1", ["https://cdn.example/a.mp4"]))
    page = client.get("/").text
    assert '<td data-count="submitted">1</td>' in page
    assert '<td data-count="processing">1</td>' in page
    assert '<td data-count="succeed">1</td>' in page
    assert '<td data-learned="callback">1</td>' in page
    assert "this process does not download" in page  # DOWNLOAD_CONCURRENCY=0 here
    assert "Oldest unfinished task" in page
    oldest = r'<dd id="oldest-unfinished"><a href="/tasks/s1">s1</a>, recorded \d+ s ago'
    assert re.search(oldest, page), page
    assert "Soonest expiry" in page and "left)" in page
    assert "deliveries per minute" in page and "3 in all" in page


def test_live_pages_listen_from_the_newest_event_before_they_were_read(
    client: TestClient,
) -> None:
    """An event written after the page was read but before its script connects is not lost:
    the stream starts after the newest event the page could have shown."""
    assert 'data-live="/live?after=0"' in client.get("/tasks").text
    deliver(client, task("l1"))
    assert client.portal is not None
    newest = client.portal.call(lambda: ledger_of(client).outbound_events(limit=1))[0].id
    for path in ("/", "/tasks", "/failures", "/events"):
        assert f'data-live="/live?after={newest}"' in client.get(path).text, path
    task_page = client.get("/tasks/l1").text
    assert f'data-live="/live?after={newest}&amp;task_id=l1"' in task_page


def test_task_list_filters_searches_and_pages(client: TestClient) -> None:
    deliver(client, task("a1"), action="videos/text2video")
    deliver(client, task("b1", "processing"), action="images/generations")
    deliver(
        client,
        task("a2", "failed", task_info={"external_task_id": "ext-a2"}),
        action="videos/text2video",
    )

    def listed(**query: str) -> list[str]:
        response = client.get("/tasks", params=query)
        assert response.status_code == 200, response.text
        return re.findall(r'<tr data-task="([^"]+)">', response.text)

    assert listed() == ["a2", "b1", "a1"]
    assert listed(status="processing") == ["b1"]
    assert listed(action="videos/text2video") == ["a2", "a1"]
    assert listed(q="ext-a2") == ["a2"]
    assert listed(q="a1") == ["a1"]
    assert listed(flagged="yes") == []
    assert listed(archived="no") == ["a2", "b1", "a1"]
    today = utc_now()[:10]
    assert listed(since=today, until=today) == ["a2", "b1", "a1"]
    assert listed(until="2000-01-01") == []
    assert client.get("/tasks", params={"since": "yesterday"}).status_code == 400
    assert client.get("/tasks", params={"cursor": "nope"}).status_code == 400

    for n in range(52):
        deliver(client, task(f"many{n}"))
    first = client.get("/tasks").text
    older = re.search(r'<a href="([^"]+)" rel="next">Older</a>', first)
    assert older, first
    second = client.get(older.group(1).replace("&amp;", "&")).text
    assert re.findall(r'<tr data-task="([^"]+)">', second) == ["many1", "many0", "a2", "b1", "a1"]


def test_the_task_page_escapes_what_the_ledger_holds(client: TestClient) -> None:
    """Status messages, errors, URLs and bodies come from outside: shown as text, never run."""
    hostile = "<script>alert(1)</script>"
    deliver(client, succeed("x1", ["javascript:alert(1)//.mp4"], task_status_msg=hostile))
    settle_next(client, AssetResult(AssetState.failed, error=f"refused: {hostile}"))
    page = client.get("/tasks/x1").text
    assert hostile not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="javascript:' not in page
    assert client.get("/tasks/unknown").status_code == 404


def test_the_task_page_previews_stored_files_through_signed_links(
    client: TestClient, settings: Settings
) -> None:
    deliver(client, succeed("v1", ["https://cdn.example/a.mp4"]))
    video = media_bytes(4096, like="mp4")
    stored = Path(settings.storage_url) / "videos" / "text2video" / "v1" / "0.mp4"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(video)
    sha = hashlib.sha256(video).hexdigest()
    done = AssetResult(
        AssetState.stored,
        location=str(stored),
        sha256=sha,
        size=len(video),
        content_type="video/mp4",
        stored_at=utc_now(),
    )
    settle_next(client, done)
    response = client.get("/tasks/v1")
    page = response.text
    link = re.search(r'<video controls preload="metadata" src="([^"]+)">', page)
    assert link, page
    assert link.group(1).startswith(settings.public_url + "/files/")
    assert sha in page and "4.0 KiB" in page and str(stored) in page
    assert f"media-src 'self' {settings.public_url};" in response.headers["content-security-policy"]
    served = client.get(link.group(1).removeprefix(settings.public_url))
    assert served.status_code == 200 and served.content == video


def test_an_image_is_previewed_in_an_img(client: TestClient, settings: Settings) -> None:
    images = [{"index": 0, "url": "https://cdn.example/a.png"}]
    deliver(client, task("i1", "succeed", task_result={"images": images}), "images/generations")
    picture = media_bytes(2048, like="png")
    stored = Path(settings.storage_url) / "i1.png"
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(picture)
    done = AssetResult(
        AssetState.stored, location=str(stored), sha256="ab", size=2048, stored_at=utc_now()
    )
    settle_next(client, done)
    page = client.get("/tasks/i1").text
    link = re.search(r'<img src="([^"]+)" alt="image 0 of task i1">', page)
    assert link, page
    assert client.get(link.group(1).removeprefix(settings.public_url)).content == picture
    assert "<video" not in page and "<audio" not in page


def test_retry_buttons_queue_failed_files_or_force_a_recheck(client: TestClient) -> None:
    deliver(client, succeed("r1", ["https://cdn.example/a.mp4"]))
    settle_next(client, AssetResult(AssetState.failed, error="404 five times"))
    page = client.get("/tasks/r1").text
    assert "404 five times" in page
    response = client.post("/tasks/r1/retry", data={"csrf": form_csrf(page)})
    assert response.status_code == 303
    assert response.headers["location"] == "/tasks/r1?queued=1"
    assert "1 file(s) queued again." in client.get(response.headers["location"]).text
    assert client.portal is not None
    found = client.portal.call(ledger_of(client).task, "r1")
    assert found is not None and found.assets[0].state is AssetState.pending
    forced = client.post("/tasks/r1/retry", data={"csrf": form_csrf(page), "force": "true"})
    assert forced.headers["location"] == "/tasks/r1?queued=0"  # pending is not re-queued


def test_failures_lists_reasons_and_retries_in_bulk(client: TestClient) -> None:
    deliver(client, succeed("f1", ["https://cdn.example/a.mp4"]))
    deliver(client, succeed("f2", ["https://cdn.example/b.mp4"]))
    deliver(client, succeed("w1", ["https://cdn.example/c.mp4"]))
    settle_next(client, AssetResult(AssetState.failed, error="the body is not a video"))
    settle_next(client, AssetResult(AssetState.failed, error="403 from the CDN"))
    page = client.get("/failures").text
    assert "the body is not a video" in page and "403 from the CDN" in page
    assert page.count('type="checkbox" name="task_id"') == 2  # w1 waits: nothing to retry
    only_failed = client.get("/failures", params={"state": "failed"}).text
    assert "w1" not in only_failed
    response = client.post(
        "/failures/retry", data={"csrf": form_csrf(page), "task_id": ["f1", "f2", "f1"]}
    )
    assert response.headers["location"] == "/failures?queued=2"
    assert client.get("/failures", params={"state": "failed"}).text.count("checkbox") == 0
    assert client.get("/failures", params={"state": "lost"}).status_code == 400


def test_events_list_detail_and_replay(client: TestClient) -> None:
    deliver(client, task("e1"))
    page = client.get("/events").text
    assert "task.updated" in page and 'href="/tasks/e1"' in page
    msg_id = re.search(r'href="/events/([^"]+)"', page)
    assert msg_id
    detail = client.get(f"/events/{msg_id.group(1)}").text
    assert "webhook-id" in detail and "&#34;task_id&#34;: &#34;e1&#34;" in detail
    assert client.get("/events/msg_none").status_code == 404
    assert client.get("/events", params={"type": "nope"}).status_code == 400
    bad = client.post("/events/replay", data={"csrf": form_csrf(page), "since": "soon"})
    assert bad.status_code == 303 and "problem=since+must+be" in bad.headers["location"]
    replayed = client.post("/events/replay", data={"csrf": form_csrf(page), "since": "1h"})
    assert replayed.headers["location"] == "/events?queued=0"  # no endpoint is set here


def test_replay_names_endpoints_without_their_secrets(settings: Settings) -> None:
    """An endpoint is chosen by its place in EVENT_WEBHOOK_URLS; only its redacted URL shows."""
    endpoints = "https://hooks.example/a?token=s3cret,https://hooks.example/b"
    configured = settings.model_copy(
        update={"event_webhook_urls": endpoints, "event_dispatch_concurrency": 0}
    )
    with TestClient(create_app(configured), follow_redirects=False) as client:
        sign_in(client)
        deliver(client, task("e1"))
        deliver(client, task("e2"))
        for path in ("/events", "/"):
            page = client.get(path).text
            assert "hooks.example/a" in page and "s3cret" not in page, path
        csrf = form_csrf(page)
        one = {"csrf": csrf, "since": "1h", "endpoint": "1", "type": "task.updated"}
        assert client.post("/events/replay", data=one).headers["location"] == "/events?queued=2"
        every = {"csrf": csrf, "since": "1h"}
        assert client.post("/events/replay", data=every).headers["location"] == "/events?queued=4"
        for wrong in ("2", "-1", "https://hooks.example/b"):
            refused = client.post("/events/replay", data=every | {"endpoint": wrong})
            assert "problem=Choose+an+endpoint" in refused.headers["location"], wrong
