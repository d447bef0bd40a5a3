"""End-to-end: the dashboard in a real headless Chromium against a real `serve` process.

Debian's chromium, driven by Playwright (which never downloads a browser here); `scripts/test`
installs the package when it is missing. Each test writes screenshots of the pages it sees to
docs/screenshots/, which the README links.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.media_server import MediaServer
from tests.support import Service, succeed_payload, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CLIP = (ROOT / "tests" / "fixtures" / "media" / "clip.mp4").read_bytes()  # 2 s of H.264
T2V = "videos/text2video"
# Every wait in the browser is bounded by this (milliseconds).
TIMEOUT_MS = 15_000
DOWNLOADS = {
    "ALLOW_PRIVATE_DOWNLOADS": "true",  # the media server is on loopback
    "DOWNLOAD_CONCURRENCY": "2",
    "DOWNLOAD_RETRY_BASE_SECONDS": "0.05",
    "DOWNLOAD_NOT_FOUND_TRIES": "1",  # a 404 fails its file at once
}


def chromium_path() -> str:
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    )
    if found is None:
        pytest.fail(
            "Debian's chromium is missing: scripts/test installs it, or as root run "
            "apt-get install -y --no-install-recommends chromium"
        )
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium_path(),
            # Chromium's sandbox refuses to start as root (CI containers run as root).
            args=["--no-sandbox"] if os.geteuid() == 0 else [],
        )
        yield launched
        launched.close()


class _Hooks(BaseHTTPRequestHandler):
    """An outbound-event endpoint that takes every event (204)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hooks() -> Iterator[str]:
    """The URL of an endpoint on loopback that accepts events."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def service(services: Callable[..., Service], hooks: str) -> Service:
    events = {"EVENT_WEBHOOK_URLS": hooks, "ALLOW_PRIVATE_EVENT_URLS": "true"}
    started: Service = services(env=DOWNLOADS | events)
    return started


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (no cookies); fails the test on any CSP violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    violations: list[str] = []

    def watch(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            violations.append(message.text)

    opened.on("console", watch)
    yield opened
    context.close()
    assert violations == []


def shoot(page: Page, name: str) -> None:
    """Write the page's screenshot where the README's Dashboard section links it."""
    assert f"(docs/screenshots/{name}.png)" in (ROOT / "README.md").read_text()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def sign_in(page: Page, service: Service, path: str = "/") -> None:
    page.goto(service.base_url + path)
    expect(page).to_have_url(f"{service.base_url}/signin?next={path.replace('/', '%2F')}")
    page.get_by_label("Admin token (ADMIN_TOKEN)").fill(service.admin_token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(service.base_url + path)


def deliver(service: Service, payload: dict[str, object]) -> None:
    response = httpx.post(
        service.callback_url(action=T2V), content=json.dumps(payload), trust_env=False
    )
    assert response.status_code == 200, response.text


def asset_state(service: Service, task_id: str) -> str | None:
    response = service.api(f"/api/tasks/{task_id}")
    if response.status_code == 404:
        return None
    state: str = response.json()["assets"][0]["state"]
    return state


def test_a_task_arrives_live_opens_and_plays_its_preview(
    page: Page, service: Service, media: MediaServer
) -> None:
    page.goto(service.base_url + "/")
    shoot(page, "signin")
    sign_in(page, service, "/tasks")
    expect(page.locator("body")).to_have_attribute("data-live", "open")  # the stream is up
    page.evaluate("window.stillThisPage = true")

    url = media.add("/kling/live1.mp4", CLIP)
    deliver(service, succeed_payload("live1", [url], T2V))

    # The row comes in through the stream, without a reload of the page.
    row = page.locator('tr[data-task="live1"]')
    expect(row).to_be_visible()
    assert page.evaluate("window.stillThisPage") is True
    wait_for(service.archived("live1"), "live1 to be archived")
    expect(row.locator(".archived")).to_be_visible()  # the archive came live too
    shoot(page, "tasks")

    row.get_by_role("link", name="live1").click()
    expect(page).to_have_url(service.base_url + "/tasks/live1")
    video = page.locator("article.asset video")
    expect(video).to_have_count(1)
    page.wait_for_function(
        "() => { const v = document.querySelector('article.asset video');"
        " return v.readyState >= 1 && Number.isFinite(v.duration) && v.duration > 0 }"
    )
    page.evaluate(
        "async () => { const v = document.querySelector('article.asset video');"
        " v.muted = true; await v.play(); }"
    )
    page.wait_for_function("() => document.querySelector('article.asset video').currentTime > 0.3")
    duration = page.evaluate("document.querySelector('article.asset video').duration")
    assert duration == pytest.approx(2.0, abs=0.1)
    page.evaluate("document.querySelector('article.asset video').pause()")
    expect(page.locator("article.asset")).to_contain_text(str(len(CLIP)))
    shoot(page, "task")

    page.get_by_role("link", name="Overview", exact=True).click()
    expect(page.locator('[data-count="succeed"]')).to_have_text("1")
    expect(page.locator("#storage")).to_have_text("ready")
    expect(page.locator("td", has_text="/hooks").locator("xpath=..")).to_contain_text("healthy")
    shoot(page, "overview")


def test_a_failed_file_is_retried_from_its_task_page(
    page: Page, service: Service, media: MediaServer
) -> None:
    url = media.url("/kling/late.mp4")  # not there yet: the CDN lags behind the callback
    deliver(service, succeed_payload("late1", [url], T2V))
    wait_for(lambda: asset_state(service, "late1") == "failed", "the file to fail")

    sign_in(page, service, "/failures")
    failed = page.locator("tr", has=page.get_by_role("link", name="late1"))
    expect(failed).to_contain_text("404")
    shoot(page, "failures")

    media.add("/kling/late.mp4", CLIP)
    failed.get_by_role("link", name="late1").click()
    expect(page.locator("article.asset .state")).to_have_text("failed")
    page.get_by_role("button", name="Retry failed files").click()
    expect(page.get_by_role("status")).to_have_text("1 file(s) queued again.")
    page.evaluate("window.stillThisPage = true")
    wait_for(service.archived("late1"), "late1 to be archived after the retry")
    # The task page follows its task's events: the file shows stored without a reload.
    expect(page.locator("article.asset .state")).to_have_text("stored")
    expect(page.locator("article.asset video")).to_have_count(1)
    assert page.evaluate("window.stillThisPage") is True

    page.get_by_role("link", name="Events", exact=True).click()
    expect(page.locator("table").first).to_contain_text("task.archived")
    shoot(page, "events")
    page.get_by_role("link", name="deliveries and attempts").first.click()
    expect(page.locator("h1")).to_contain_text("task.archived")
    delivery = page.locator("article.delivery")
    for _ in range(50):  # bounded: the dispatcher sends within a second
        if "delivered" in delivery.inner_text():
            break
        page.wait_for_timeout(200)
        page.reload()
    expect(delivery.locator(".state")).to_have_text("delivered")
    expect(delivery.locator("tbody")).to_contain_text("204")
    shoot(page, "event")


def test_without_the_token_nothing_is_shown(page: Page, service: Service) -> None:
    deliver(service, succeed_payload("secret1", [], T2V))
    for path in ("/", "/tasks", "/tasks/secret1", "/failures", "/events"):
        page.goto(service.base_url + path)
        expect(page).to_have_url(f"{service.base_url}/signin?next={path.replace('/', '%2F')}")
        expect(page.locator("body")).not_to_contain_text("secret1")

    page.get_by_label("Admin token (ADMIN_TOKEN)").fill("not-the-admin-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That is not the admin token (ADMIN_TOKEN).")
    assert [c["name"] for c in page.context.cookies()] == ["kr_signin"]
    shoot(page, "signin-refused")
    live = page.request.get(service.base_url + "/live")
    assert live.status == 401


def test_a_triggered_task_is_shown_archived_with_its_previews(
    page: Page, services: Callable[..., Service]
) -> None:
    """`kling-receiver trigger succeed --with video,image` against a service on its defaults
    (its own download workers, private addresses refused) ends with the task archived, and
    its page shows both files playable and stored."""
    service = services(env={"DOWNLOAD_CONCURRENCY": "4"})  # the tests' services start at 0
    done = service.cli("trigger", "succeed", "--with", "video,image", timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = done.stdout.split("for task ")[1].split(":")[0]
    assert f"task {task_id} archived: 2 files stored" in done.stdout

    sign_in(page, service, f"/tasks/{task_id}")
    expect(page.locator("#archived")).not_to_have_text("no")
    expect(page.locator("article.asset .state")).to_have_text(["stored", "stored"])
    expect(page.locator("article.asset video")).to_have_count(1)
    expect(page.locator("article.asset img")).to_have_count(1)
    page.wait_for_function(
        "() => { const v = document.querySelector('article.asset video');"
        " return v.readyState >= 1 && Number.isFinite(v.duration) && v.duration > 0 }"
    )
    page.wait_for_function("() => document.querySelector('article.asset img').naturalWidth > 0")
