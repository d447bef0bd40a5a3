"""End-to-end downloads: real `serve` and `worker` processes, a media server on loopback."""

from __future__ import annotations

import hashlib
import json
import random
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from receiver import tokens
from tests.media_server import MediaServer, Serve, Status, Trickle, media_bytes
from tests.support import (
    Service,
    assert_error,
    free_port,
    json_lines,
    post_all,
    succeed_payload,
    wait_for,
)

pytestmark = pytest.mark.e2e

T2V = "videos/text2video"
IMAGES = "images/generations"
JSON = {"content-type": "application/json"}
# Loopback media, retries due in tens of milliseconds.
DOWNLOADS = {
    "ALLOW_PRIVATE_DOWNLOADS": "true",
    "DOWNLOAD_RETRY_BASE_SECONDS": "0.05",
    "DOWNLOAD_CONCURRENCY": "2",
}


@pytest.fixture
def spawn(services: Callable[..., Service]) -> Callable[..., Service]:
    """Start a service with downloads on; it and its workers are killed at the end of the test."""
    return lambda **env: services(env=DOWNLOADS | env)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def succeed(task_id: str, external: str, urls: list[str], action: str = T2V) -> bytes:
    """A succeed callback body for this task, naming these URLs."""
    data = succeed_payload(task_id, urls, action)
    data["task_info"] = {"external_task_id": external}
    return json.dumps(data).encode()


def deliver(service: Service, external: str, body: bytes, action: str = T2V) -> None:
    url = service.callback_url(tokens.task_ref(external), action)
    response = httpx.post(url, content=body, headers=JSON, trust_env=False)
    assert response.status_code == 200, response.text


def stored_files(root: Path) -> list[Path]:
    """The downloaded files under the storage dir (not sidecars, not hidden parts)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".json"
    )


def leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*") if ".part" in p.name)


def test_callback_ends_stored_and_archived(
    spawn: Callable[..., Service], media: MediaServer
) -> None:
    """A succeed callback is downloaded by `serve`'s workers, stored with a sidecar and archived."""
    service = spawn()
    body = media_bytes(300_000, 1)
    url = media.add("/e2e/a.mp4", body)

    deliver(service, "kr_e2e_a", succeed("e2ea", "kr_e2e_a", [url]))
    wait_for(service.archived("e2ea"), "the task to be archived")

    (asset,) = service.task("e2ea")["assets"]
    assets_dir = service.data_dir / "assets"
    assert asset["state"] == "stored"
    assert (asset["sha256"], asset["size"]) == (sha(body), len(body))
    assert asset["location"] == str((assets_dir / T2V / "e2ea" / "0.mp4").resolve())
    assert Path(asset["location"]).read_bytes() == body
    sidecar = json.loads(Path(asset["location"] + ".json").read_text())
    assert (sidecar["task_id"], sidecar["source_url"]) == ("e2ea", url)
    assert sidecar["sha256"] == sha(body)
    listed = service.api("/api/tasks", archived="true").json()["tasks"]
    assert [t["task_id"] for t in listed] == ["e2ea"]
    assert len(media.hits("/e2e/a.mp4")) == 1
    assert leftovers(assets_dir) == []


def test_killed_download_resumes_after_restart(
    spawn: Callable[..., Service], media: MediaServer
) -> None:
    """SIGKILL mid-download, then a restart: the file completes by Range, with the right sha256."""
    service = spawn(DOWNLOAD_CONCURRENCY="1", DOWNLOAD_LEASE_SECONDS="2")
    body = media_bytes(8 << 20, 8)
    url = media.add("/e2e/big.mp4", body, [Serve(rate=2 << 20), Serve()])
    part = service.data_dir / "assets" / T2V / "e2ebig" / ".0.part"

    deliver(service, "kr_e2e_big", succeed("e2ebig", "kr_e2e_big", [url]))
    wait_for(lambda: part.exists() and part.stat().st_size >= 2 << 20, "2 MiB on disk", 10)
    service.stop(signal.SIGKILL)
    held = part.stat().st_size
    assert held < len(body)

    service.start()
    wait_for(service.archived("e2ebig"), "the resumed download", 20)

    (asset,) = service.task("e2ebig")["assets"]
    assert (asset["state"], asset["sha256"], asset["size"]) == ("stored", sha(body), len(body))
    assert Path(asset["location"]).read_bytes() == body
    first, resumed = media.hits("/e2e/big.mp4")
    assert "Range" not in first.headers
    assert resumed.headers["Range"] == f"bytes={held}-"
    assert resumed.headers["If-Range"]
    assert leftovers(service.data_dir / "assets") == []


def test_two_worker_processes_fetch_each_file_once(
    spawn: Callable[..., Service], media: MediaServer
) -> None:
    """50 tasks x 2 images, each succeed delivered twice, two workers: 100 files, 100 fetches.

    The second worker has no --concurrency: DOWNLOAD_CONCURRENCY=0 turns off only serve's pool.
    """
    service = spawn(DOWNLOAD_CONCURRENCY="0")
    service.start_worker("--concurrency", "3")
    service.start_worker()
    bodies: dict[str, bytes] = {}
    deliveries: list[tuple[str, bytes]] = []
    for t in range(50):
        paths = [f"/e2e/many/{t}/{n}.png" for n in (0, 1)]
        for path in paths:
            bodies[path] = media_bytes(2000, path, "png")
            # ~0.1 s a fetch, so that both workers are busy at once.
            media.add(path, bodies[path], [Serve(rate=20_000, content_type="image/png")])
        external = f"kr_e2e_many_{t}"
        url = service.callback_url(tokens.task_ref(external), IMAGES)
        body = succeed(f"many{t}", external, [media.url(p) for p in paths], IMAGES)
        deliveries += [(url, body), (url, body)]
    random.Random(50).shuffle(deliveries)

    responses = post_all(deliveries)
    assert [r.status_code for r in responses] == [200] * len(responses)
    outcomes = Counter(response.json()["outcome"] for response in responses)

    assert outcomes == {"moved": 50, "duplicate": 50}
    wait_for(
        lambda: len(service.api("/api/tasks", archived="true", limit=200).json()["tasks"]) == 50,
        "all 50 tasks to be archived",
        30,
    )
    assert {path: len(media.hits(path)) for path in bodies} == dict.fromkeys(bodies, 1)
    root = service.data_dir / "assets"
    files = stored_files(root)
    assert len(files) == 100
    assert sorted(sha(f.read_bytes()) for f in files) == sorted(sha(b) for b in bodies.values())
    assert leftovers(root) == []
    assert all(worker.poll() is None for worker in service.workers)
    logs = [json_lines(service.worker_log_path(n).read_text()) for n in range(2)]
    downloads = [[e for e in log if e.get("message") == "download"] for log in logs]
    assert all(downloads), "both workers should have taken jobs"
    started = [[e["concurrency"] for e in log if "concurrency" in e] for log in logs]
    assert started == [[3], [4]]
    assert sum(len(each) for each in downloads) == 100
    assert {entry["state"] for each in downloads for entry in each} == {"stored"}


def test_retry_from_the_cli_and_the_api_fetches_again(
    spawn: Callable[..., Service], media: MediaServer
) -> None:
    """`retry --force` and POST /api/tasks/{id}/retry queue assets that are then fetched again."""
    service = spawn(DOWNLOAD_NOT_FOUND_TRIES="1")
    old, new = media_bytes(9000, "old"), media_bytes(9000, "new")
    url = media.add("/e2e/r.mp4", old)
    deliver(service, "kr_e2e_r", succeed("e2er", "kr_e2e_r", [url]))
    wait_for(service.archived("e2er"), "the first download")

    nothing = service.cli("retry", "e2er")
    assert (nothing.returncode, nothing.stdout.split()[:2]) == (0, ["queued", "0"])
    media.add("/e2e/r.mp4", new)
    forced = service.cli("retry", "e2er", "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.split()[:2] == ["queued", "1"]
    wait_for(service.archived("e2er"), "the forced download")

    (asset,) = service.task("e2er")["assets"]
    assert (asset["state"], asset["sha256"]) == ("stored", sha(new))
    assert "differ" in asset["error"]
    assert Path(asset["location"]).read_bytes() == new
    assert len(media.hits("/e2e/r.mp4")) == 2

    again = httpx.post(
        service.base_url + "/api/tasks/e2er/retry",
        params={"force": "true"},
        headers=service.admin,
        trust_env=False,
    )
    assert again.json() == {"task_id": "e2er", "queued": 1}
    wait_for(lambda: len(media.hits("/e2e/r.mp4")) == 3, "the third fetch")
    wait_for(service.archived("e2er"), "the task to be archived again")
    assert service.task("e2er")["assets"][0]["error"] is None  # same bytes as last time

    # A failed asset comes back with a plain retry once its URL answers.
    late = media.url("/e2e/late.mp4")
    deliver(service, "kr_e2e_late", succeed("e2elate", "kr_e2e_late", [late]))
    wait_for(
        lambda: service.task("e2elate")["assets"][0]["state"] == "failed",
        "the 404 to fail the asset",
    )
    media.add("/e2e/late.mp4", new)
    retried = httpx.post(
        service.base_url + "/api/tasks/e2elate/retry", headers=service.admin, trust_env=False
    )
    assert retried.json() == {"task_id": "e2elate", "queued": 1}
    wait_for(service.archived("e2elate"), "the retried download")

    unknown = service.cli("retry", "no-such-task")
    assert unknown.returncode == 1
    assert "no-such-task" in unknown.stderr
    missing = httpx.post(
        service.base_url + "/api/tasks/no-such-task/retry", headers=service.admin, trust_env=False
    )
    assert_error(missing, 404, "unknown_task", "no-such-task")


def test_retry_failed_queues_every_failed_task_again(
    spawn: Callable[..., Service], media: MediaServer
) -> None:
    """`retry --failed` finds the tasks with a failed asset in the ledger and queues them all;
    `retry` with nothing to retry says what it needs."""
    service = spawn(DOWNLOAD_NOT_FOUND_TRIES="1")
    body = media_bytes(5000, "late")
    stored_url = media.add("/e2e/fine.mp4", body)
    deliver(service, "kr_e2e_fine", succeed("e2efine", "kr_e2e_fine", [stored_url]))
    for n in range(3):
        late = media.url(f"/e2e/late{n}.mp4")
        deliver(service, f"kr_e2e_late{n}", succeed(f"e2elate{n}", f"kr_e2e_late{n}", [late]))
    for n in range(3):
        wait_for(lambda n=n: asset_states(service, f"e2elate{n}")() == ["failed"], "a 404")
        media.add(f"/e2e/late{n}.mp4", body)
    wait_for(service.archived("e2efine"), "the file that was there")

    retried = service.cli("retry", "--failed")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == "queued 3 asset(s) of 3 task(s) for download"
    for n in range(3):
        wait_for(service.archived(f"e2elate{n}"), "the retried download")
    assert len(media.hits("/e2e/fine.mp4")) == 1  # a stored file is left alone

    nothing = service.cli("retry")
    assert nothing.returncode == 2 and "--failed" in nothing.stderr


def asset_states(service: Service, task_id: str) -> Callable[[], list[str]]:
    return lambda: [asset["state"] for asset in service.task(task_id)["assets"]]


def test_an_error_page_is_never_stored_as_the_video(
    spawn: Callable[..., Service], media: MediaServer
) -> None:
    """A 200 with an HTML page (as text/html, or disguised as octet-stream) for a video is
    retried, then the asset fails with the reason; nothing is left in storage."""
    service = spawn(DOWNLOAD_RETRY_HOURS=str(1.5 / 3600))
    page = b"<html><body><h1>403 Forbidden</h1></body></html>\n"
    urls = [
        media.add("/e2e/page.mp4", page, [Serve(content_type="text/html")]),
        media.add("/e2e/disguised.mp4", page, [Serve(content_type="application/octet-stream")]),
    ]
    deliver(service, "kr_e2e_page", succeed("e2epage", "kr_e2e_page", urls))
    wait_for(lambda: asset_states(service, "e2epage")() == ["failed"] * 2, "both to fail", 15)

    first, second = service.task("e2epage")["assets"]
    assert first["error"] == "the server sent text/html, not a video"
    assert second["error"] == "the body is not a video: it starts like HTML"
    assert first["attempts"] >= 2 and second["attempts"] >= 2
    assert (first["location"], first["sha256"], second["location"]) == (None, None, None)
    assert stored_files(service.data_dir / "assets") == []
    assert leftovers(service.data_dir / "assets") == []
    assert not service.task("e2epage")["archived"]


def test_a_gzip_forced_video_is_stored_decoded(
    spawn: Callable[..., Service], media: MediaServer
) -> None:
    """A server that gzips although asked for identity: the video is stored decoded, with
    the video's own sha256 and size in the ledger and the sidecar."""
    service = spawn()
    body = media_bytes(200_000, "gz") + bytes(300_000)
    url = media.add("/e2e/gz.mp4", body, [Serve(encoding="gzip")])

    deliver(service, "kr_e2e_gz", succeed("e2egz", "kr_e2e_gz", [url]))
    wait_for(service.archived("e2egz"), "the task to be archived")

    (asset,) = service.task("e2egz")["assets"]
    assert (asset["sha256"], asset["size"]) == (sha(body), len(body))
    assert Path(asset["location"]).read_bytes() == body
    sidecar = json.loads(Path(asset["location"] + ".json").read_text())
    assert (sidecar["sha256"], sidecar["size"]) == (sha(body), len(body))


def test_trickles_free_their_slots_for_the_assets_behind_them(
    spawn: Callable[..., Service], media: MediaServer
) -> None:
    """Four URLs sending a byte every 0.2 s take all four slots; with DOWNLOAD_MIN_RATE=1000
    over 1 s windows each attempt is cut within the bound, and an asset queued behind them
    is stored."""
    service = spawn(DOWNLOAD_CONCURRENCY="4", DOWNLOAD_MIN_RATE="1000", DOWNLOAD_RATE_WINDOW="1")
    drips = [f"/e2e/drip/{n}.mp4" for n in range(4)]
    urls = [media.add(path, media_bytes(1000, path), [Trickle(every=0.2)]) for path in drips]
    deliver(service, "kr_e2e_drip", succeed("e2edrip", "kr_e2e_drip", urls))
    wait_for(lambda: all(media.hits(path) for path in drips), "all four slots to be taken")
    body = media_bytes(100_000, "behind")
    behind = media.add("/e2e/behind.mp4", body)

    deliver(service, "kr_e2e_behind", succeed("e2ebehind", "kr_e2e_behind", [behind]))
    wait_for(service.archived("e2ebehind"), "the asset behind the trickles", 10)

    assert service.task("e2ebehind")["assets"][0]["sha256"] == sha(body)
    wait_for(lambda: all(media.hits(path)[0].ended for path in drips), "the first hang-ups", 5)
    held = [hit.ended - hit.at for path in drips for hit in media.hits(path) if hit.ended]
    assert max(held) < 3, held  # a 1 s window, a read every 0.2 s, a hang-up seen at a write
    for asset in service.task("e2edrip")["assets"]:
        if asset["error"] is not None:
            assert asset["error"].startswith("too slow: ")


def test_a_huge_retry_after_neither_jams_nor_parks_the_asset(
    spawn: Callable[..., Service], media: MediaServer
) -> None:
    """Retry-After: 99999999999999999999 once, then the file: the same process stores it, at
    the end of a 3.6 s retry horizon rather than never."""
    service = spawn(DOWNLOAD_RETRY_HOURS="0.001")
    body = media_bytes(50_000, "later")
    hostile = Status(503, {"Retry-After": "99999999999999999999"})
    url = media.add("/e2e/later.mp4", body, [hostile, Serve()])
    assert service.process is not None
    pid = service.process.pid

    deliver(service, "kr_e2e_later", succeed("e2elater", "kr_e2e_later", [url]))
    wait_for(service.archived("e2elater"), "the retried download", 10)

    (asset,) = service.task("e2elater")["assets"]
    assert (asset["state"], asset["sha256"], asset["attempts"]) == ("stored", sha(body), 2)
    assert service.process is not None and service.process.pid == pid
    assert service.process.poll() is None
    assert len(media.hits("/e2e/later.mp4")) == 2
    messages = [entry.get("message") for entry in service.log_entries()]
    assert "download crashed" not in messages


def test_a_worker_without_its_database_says_so_and_exits(tmp_path: Path) -> None:
    """A worker whose PostgreSQL is not there ends with one log line and status 3, as serve."""
    nowhere = f"postgresql://kr@127.0.0.1:{free_port()}/none"
    done = Service(tmp_path / "data", env={"DATABASE_URL": nowhere}).cli("worker", timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    (line,) = json_lines(done.stdout + done.stderr)
    assert (line["level"], line["message"]) == ("critical", "cannot open the ledger")
    assert "cannot open the PostgreSQL database" in line["error"]
    assert "Traceback" not in done.stderr
