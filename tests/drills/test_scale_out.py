"""Drills: the service scaled out on one PostgreSQL, and that PostgreSQL restarted mid-burst.

1. Two receivers and three `worker` processes share one PostgreSQL ledger and one storage
   directory; every succeed callback arrives twice, once at each receiver; one worker is
   SIGKILLed mid-download. Every asset is still stored exactly once, fetched once (bar
   the killed worker's own attempts), and every delivery is in the ledger once.
2. PostgreSQL is stopped in the middle of a burst of callbacks and started again: the
   receiver answers 503 (not ready) meanwhile, every delivery it acknowledged is kept, and
   the burst completes without the process being restarted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from receiver import tokens
from storage.sniff import HEAD_SIZE
from tests.media_server import MediaServer, Serve, media_bytes
from tests.pg_server import PostgresServer
from tests.support import Service, post_all, succeed_payload, wait_for

pytestmark = pytest.mark.e2e

IMAGES = "images/generations"
# Loopback media, retries due in tens of milliseconds.
DOWNLOADS = {"ALLOW_PRIVATE_DOWNLOADS": "true", "DOWNLOAD_RETRY_BASE_SECONDS": "0.05"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def succeed_body(task_id: str, external: str, urls: list[str]) -> bytes:
    data = succeed_payload(task_id, urls, IMAGES)
    data["task_info"] = {"external_task_id": external}
    return json.dumps(data).encode()


def api_client(service: Service) -> httpx.Client:
    """One keep-alive client for many admin API calls (`Service.api` connects each time)."""
    return httpx.Client(base_url=service.base_url, headers=service.admin, trust_env=False)


def all_tasks(service: Service) -> dict[str, dict[str, Any]]:
    """Every task the API lists, by task id, following its cursor."""
    tasks: dict[str, dict[str, Any]] = {}
    cursor = None
    with api_client(service) as api:
        while True:
            params = {"limit": 200} | ({"cursor": cursor} if cursor else {})
            page = api.get("/api/tasks", params=params).json()
            tasks |= {task["task_id"]: task for task in page["tasks"]}
            cursor = page["next_cursor"]
            if not cursor:
                return tasks


def all_archived(service: Service) -> Callable[[], bool]:
    """A check for `wait_for`: no task the ledger knows is waiting for a file."""

    def check() -> bool:
        page = service.api("/api/tasks", archived="false", limit=1).json()
        return not page["tasks"]

    return check


def stored_media(root: Path) -> list[Path]:
    """The visible files under the storage root that are not sidecars."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".json"
    )


def hidden_files(root: Path) -> list[Path]:
    """`.part` files, their notes, sidecars being written: none may be left at the end."""
    return sorted(p for p in root.rglob(".*") if p.is_file())


def check_archive(tasks: dict[str, dict[str, Any]], sources: dict[str, bytes], root: Path) -> None:
    """Every task archived, each asset stored with its source's bytes, and the storage root
    holding exactly one file and one sidecar per asset, nothing hidden left behind."""
    locations = []
    for task_id, task in tasks.items():
        assert (task["status"], task["archived"]) == ("succeed", True), task_id
        for asset in task["assets"]:
            source = sources[asset["url"]]
            assert asset["state"] == "stored", (task_id, asset)
            assert (asset["sha256"], asset["size"]) == (sha(source), len(source)), asset
            stored = Path(asset["location"])
            assert stored.is_relative_to(root.resolve()), asset
            assert sha(stored.read_bytes()) == sha(source), f"{stored} holds the wrong bytes"
            locations.append(stored)
    assert sorted(stored_media(root.resolve())) == sorted(locations), "stray or missing files"
    sidecars = sorted(p for p in root.resolve().rglob("*.json") if not p.name.startswith("."))
    assert sidecars == sorted(p.with_name(p.name + ".json") for p in locations)
    assert hidden_files(root) == [], "partial files left behind"


def errors_logged(*logs: Path) -> list[str]:
    """Error lines of these JSON logs, one line each."""
    found = []
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") in ("error", "critical"):
                found.append(f"{path.name}: {entry['message']} {entry.get('exception', '')}")
    return found


# -- 1. two receivers, three workers ---------------------------------------------------------

TASKS = 300
# A download reaches its .part 1 MiB at a time (storage.fetch.READ_SIZE): a slow file of
# 2.5 MiB holds exactly 1 MiB on disk from its 2nd to its 4th second, when a worker is
# caught with at least half a MiB still to come.
SLOW_SIZE = 5 << 19
SLOW_RATE = 512 << 10  # bytes/s


@dataclass(frozen=True)
class Held:
    """What the killed worker held when it died: its leased assets and its .part sizes."""

    pid: int
    urls: frozenset[str]
    parts: dict[str, int]  # asset URL -> bytes of its .part file after the kill
    caught: str  # the slow asset it was caught downloading
    at: float  # monotonic time of the SIGKILL


def lease_pid(owner: str) -> int:
    """The pid in a lease owner (`host:pid:nonce`, `receiver.ledger.lease_owner`)."""
    return int(owner.split(":")[-2])


def part_path(root: Path, task_id: str, index: int) -> Path:
    return root / IMAGES / task_id / f".{index}.part"


def test_two_receivers_and_three_workers_store_each_asset_once(
    services: Callable[..., Service],
    media: MediaServer,
    postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    """300 tasks x 2 images, each succeed sent to both receivers at once; a worker is
    SIGKILLed mid-download. Every delivery is recorded once (a move and a duplicate), every
    asset stored once with the right bytes, and fetched once but for the killed one's."""
    database = postgres.create_database()
    root = tmp_path / "assets"
    # Same database, same storage root and (Service's test secrets) the same CALLBACK_SECRET
    # and ADMIN_TOKEN: a callback URL either receiver made verifies on the other.
    env = DOWNLOADS | {
        "DATABASE_URL": database,
        "STORAGE_URL": str(root),
        "DOWNLOAD_CONCURRENCY": "0",
        # The killed worker's jobs are taken over once its leases lapse: soon, in a drill.
        "DOWNLOAD_LEASE_SECONDS": "3",
    }
    first, second = services("a", env=env), services("b", env=env)
    workers = [first.start_worker("--concurrency", "4") for _ in range(3)]

    sources: dict[str, bytes] = {}  # asset URL -> its bytes
    where: dict[str, tuple[str, int]] = {}  # asset URL -> (task id, index)
    slow: set[str] = set()
    deliveries: list[tuple[str, bytes]] = []
    rng = random.Random(300)
    for t in range(TASKS):
        task_id, external = f"so{t}", f"kr_so_{t}"
        urls = []
        for index in (0, 1):
            path = f"/so/{t}/{index}.png"
            if index == 1 and t % 37 == 5:  # 8 slow files, spread through the queue
                data, rate = media_bytes(SLOW_SIZE, path, "png"), SLOW_RATE
            else:
                data, rate = media_bytes(rng.randrange(2 << 10, 40 << 10), path, "png"), None
            url = media.add(path, data, [Serve(rate=rate, content_type="image/png")])
            sources[url], where[url] = data, (task_id, index)
            if rate:
                slow.add(url)
            urls.append(url)
        body = succeed_body(task_id, external, urls)
        ref = tokens.task_ref(external)
        # Both copies at once, one at each receiver, in either order.
        pair = [(first.callback_url(ref, IMAGES), body), (second.callback_url(ref, IMAGES), body)]
        deliveries += pair if t % 2 == 0 else pair[::-1]
    rng.shuffle(deliveries)

    with ThreadPoolExecutor(1) as pool, psycopg.connect(database, autocommit=True) as db:
        sending = pool.submit(post_all, deliveries)
        held = kill_mid_download(db, workers, root, slow, where)
        responses = sending.result(timeout=60)
    survivors = [worker for worker in workers if worker.pid != held.pid]

    statuses = Counter(response.status_code for response in responses)
    assert statuses == {200: 2 * TASKS}, f"deliveries not answered 200: {statuses}"
    outcomes = Counter(response.json()["outcome"] for response in responses)
    assert outcomes == {"moved": TASKS, "duplicate": TASKS}
    wait_for(all_archived(first), "every task archived", 60)

    # One ledger behind both receivers; each task has one distinct delivery, received twice.
    tasks = all_tasks(first)
    assert all_tasks(second) == tasks
    assert len(tasks) == TASKS
    with api_client(second) as api:
        for task_id, task in tasks.items():
            assert task["updates"] == 1, (task_id, task["updates"])
            (event,) = api.get(f"/api/tasks/{task_id}/events").json()["events"]
            assert event["times_received"] == 2, (task_id, event["times_received"])
            assert len(task["assets"]) == 2, task_id
    check_archive(tasks, sources, root)
    assert len(stored_media(root)) == 2 * TASKS

    check_fetches(media, sources, held)
    assert all(worker.poll() is None for worker in survivors), "a surviving worker exited"
    logs = [first.log_path, second.log_path]
    logs += [first.worker_log_path(n) for n, w in enumerate(workers) if w.pid != held.pid]
    assert errors_logged(*logs) == []


def kill_mid_download(
    db: psycopg.Connection[Any],
    workers: list[subprocess.Popen[bytes]],
    root: Path,
    slow: set[str],
    where: dict[str, tuple[str, int]],
) -> Held:
    """Once 60 assets are stored, SIGKILL a worker caught with a slow file part on disk.

    It is stopped (SIGSTOP) first, so that what it leased is read from the ledger while it
    can neither settle nor claim anything: those are exactly the jobs its death abandons.
    """
    by_pid = {worker.pid: worker for worker in workers}
    caught: list[tuple[int, str]] = []

    def catch() -> bool:
        stored = db.execute("SELECT count(*) FROM assets WHERE state = 'stored'").fetchone()
        if stored is None or stored[0] < 60:
            return False
        leased = db.execute("SELECT url, lease_owner FROM assets WHERE state = 'downloading'")
        for url, owner in leased.fetchall():
            part = part_path(root, *where[url])
            if url in slow and part.exists() and part.stat().st_size == 1 << 20:
                caught.append((lease_pid(owner), url))
                return True
        return False

    wait_for(catch, "a worker to be half-way through a slow file", 30)
    pid, url = caught[0]
    victim = by_pid[pid]
    victim.send_signal(signal.SIGSTOP)
    time.sleep(0.3)  # a settle it sent just before it stopped is committed by now
    leased = db.execute("SELECT url, lease_owner FROM assets WHERE state = 'downloading'")
    urls = frozenset(u for u, owner in leased.fetchall() if lease_pid(owner) == pid)
    at = time.monotonic()
    victim.kill()
    victim.wait(10)
    assert url in urls
    parts = {}
    for held_url in urls:
        part = part_path(root, *where[held_url])
        parts[held_url] = part.stat().st_size if part.exists() else 0
    print(f"killed worker {pid} holding {len(urls)} jobs: {parts}")
    return Held(pid, urls, parts, url, at)


def check_fetches(media: MediaServer, sources: dict[str, bytes], held: Held) -> None:
    """Each asset was fetched once: exactly one answer delivered its file's last byte.

    The rule, per file: an asset the killed worker did not hold was requested once, and
    that answer ran from byte 0 to the end. An asset it held may have had one request
    before the kill (the dead worker's, cut short or not: its bytes died with it, or wait
    in its .part) and then exactly one after, which delivered the end of the file; where
    the dead worker left a resumable .part, that one is a Range request from the .part's
    end, so the file crossed the network once in all.
    """
    prefix = media.base_url
    caught_partial = False
    for url, data in sources.items():
        hits = media.hits(url.removeprefix(prefix))
        if url not in held.urls:
            assert len(hits) == 1, f"{url} was requested {len(hits)} times"
            (hit,) = hits
            assert (hit.status, hit.first_byte) == (200, 0), (url, hit)
            assert hit.reached_end(len(data)), f"{url}: its one answer stopped at {hit.sent}"
            continue
        before = [hit for hit in hits if hit.at < held.at]
        after = [hit for hit in hits if hit.at >= held.at]
        assert len(before) <= 1, f"{url}: {len(before)} requests before the kill"
        assert len(after) == 1, f"{url}: {len(after)} requests after the kill"
        (taken_over,) = after
        assert taken_over.reached_end(len(data)), (url, taken_over)
        cut = before and not before[0].reached_end(len(data))
        caught_partial = caught_partial or bool(cut)
        if cut and resumable(held.parts[url]):
            assert taken_over.headers.get("Range") == f"bytes={held.parts[url]}-", (
                f"{url}: the dead worker's {held.parts[url]} bytes were fetched again"
            )
            assert (taken_over.status, taken_over.first_byte) == (206, held.parts[url])
    (caught,) = [hit for hit in media.hits(held.caught.removeprefix(prefix)) if hit.at < held.at]
    assert 0 < held.parts[held.caught] < SLOW_SIZE
    assert not caught.reached_end(SLOW_SIZE), "the kill did not land mid-download"
    assert caught_partial


def resumable(held_bytes: int) -> bool:
    """Whether a .part this long is resumed: fewer bytes than the start check needs are not."""
    return held_bytes >= HEAD_SIZE


# -- 2. PostgreSQL restarted mid-burst --------------------------------------------------------


@dataclass
class Sender:
    """Sends every delivery, paced, with up to 32 in flight, each again until answered 2xx.

    Kling's aggregator would not resend; a test sender must, to show that nothing the
    receiver acknowledged is lost and that it takes deliveries again once the database is
    back. Only a 503 (or a connection error) is sent again; any other answer is a failure.
    """

    deliveries: list[tuple[str, bytes]]
    interval: float
    patience: float = 60.0
    acked: dict[int, float] = field(default_factory=dict)  # delivery -> when answered 2xx
    answers: Counter[int | str] = field(default_factory=Counter)
    unexpected: list[tuple[int, int, str]] = field(default_factory=list)
    failure: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.failure = exc

    async def _run(self) -> None:
        gate = asyncio.Semaphore(32)
        loop = asyncio.get_running_loop()
        began = loop.time()
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:

            async def one(number: int, url: str, body: bytes) -> None:
                await asyncio.sleep(max(0.0, began + number * self.interval - loop.time()))
                async with gate:
                    deadline = loop.time() + self.patience
                    while loop.time() < deadline:
                        try:
                            response = await client.post(
                                url, content=body, headers={"content-type": "application/json"}
                            )
                        except httpx.TransportError as exc:
                            self.answers[type(exc).__name__] += 1
                        else:
                            self.answers[response.status_code] += 1
                            if response.is_success:
                                self.acked[number] = time.monotonic()
                                return
                            if response.status_code != 503:
                                self.unexpected.append(
                                    (number, response.status_code, response.text)
                                )
                                return
                        await asyncio.sleep(0.1)

            await asyncio.gather(
                *(one(number, url, body) for number, (url, body) in enumerate(self.deliveries))
            )


def readyz(service: Service) -> int:
    return ready_answer(service).status_code


def ready_answer(service: Service) -> httpx.Response:
    return httpx.get(service.base_url + "/readyz", timeout=5, trust_env=False)


def test_postgres_restarted_mid_burst_loses_no_acknowledged_delivery(
    services: Callable[..., Service], media: MediaServer, postgres: PostgresServer
) -> None:
    """A burst of 300 succeed callbacks, PostgreSQL stopped after ~80 and started again.

    While it is down the receiver is not ready and answers 503; afterwards every delivery
    is answered 200 and recorded, every file stored once, by the same process, never
    restarted.
    """
    database = postgres.create_database()
    # The default 30 s lease outlasts the outage: a download finished meanwhile is still
    # its worker's to record when the database is back, and no one else's to fetch again.
    service = services(env=DOWNLOADS | {"DATABASE_URL": database, "DOWNLOAD_CONCURRENCY": "4"})
    assert service.process is not None
    process = service.process
    root = service.data_dir / "assets"

    sources: dict[str, bytes] = {}
    deliveries: list[tuple[str, bytes]] = []
    for t in range(TASKS):
        task_id, external = f"pg{t}", f"kr_pg_{t}"
        path = f"/pg/{t}.png"
        # Some files take a second, so that downloads are in flight when the database goes.
        rate = 20 << 10 if t % 25 == 0 else None
        data = media_bytes(random.Random(t).randrange(2 << 10, 20 << 10), path, "png")
        url = media.add(path, data, [Serve(rate=rate, content_type="image/png")])
        sources[url] = data
        body = succeed_body(task_id, external, [url])
        deliveries.append((service.callback_url(tokens.task_ref(external), IMAGES), body))

    sender = Sender(deliveries, interval=0.02)
    sending = threading.Thread(target=sender.run, name="burst", daemon=True)
    sending.start()
    try:
        wait_for(lambda: len(sender.acked) >= 80, "80 deliveries acknowledged", 20)
        postgres.stop("immediate")  # a crash: the next start replays the WAL
        down_at = time.monotonic()
        try:
            wait_for(lambda: readyz(service) == 503, "/readyz to say not ready", 15)
            # Down until deliveries have met the outage: answered 503 and sent again.
            wait_for(lambda: sender.answers[503] >= 10, "deliveries answered 503", 20)
            not_ready = ready_answer(service)
            assert not_ready.status_code == 503
            assert "database" in not_ready.json()["reason"], not_ready.text
        finally:
            postgres.start()
        up_at = time.monotonic()
        wait_for(lambda: readyz(service) == 200, "/readyz ready again", 20)
        ready_after = time.monotonic() - up_at
    finally:
        sending.join(90)
    assert not sending.is_alive(), "the sender did not finish"
    assert sender.failure is None, f"the sender broke: {sender.failure!r}"
    print(
        f"answers {dict(sender.answers)}; PostgreSQL down {up_at - down_at:.1f} s, "
        f"/readyz ready {ready_after:.1f} s after it was back"
    )
    assert sender.unexpected == [], "answers other than 2xx or 503"
    dropped = {answer: n for answer, n in sender.answers.items() if isinstance(answer, str)}
    assert dropped == {}, "the receiver left deliveries unanswered"
    assert len(sender.acked) == TASKS, f"{TASKS - len(sender.acked)} never answered 2xx"

    wait_for(all_archived(service), "every task archived", 60)
    tasks = all_tasks(service)
    assert len(tasks) == TASKS
    with api_client(service) as api:
        for _, body in deliveries:
            task_id = json.loads(body)["task_id"]
            events = api.get(f"/api/tasks/{task_id}/events").json()["events"]
            assert [event["body"].encode() for event in events] == [body], task_id
            assert tasks[task_id]["updates"] == 1, task_id
    check_archive(tasks, sources, root)
    assert len(stored_media(root)) == TASKS
    for url, data in sources.items():
        hits = media.hits(url.removeprefix(media.base_url))
        full = [hit for hit in hits if hit.reached_end(len(data))]
        assert (len(hits), len(full)) == (1, 1), f"{url} was fetched {len(hits)} times"

    # The same process throughout: never exited, never started again.
    assert service.process is process and process.poll() is None
    starts = [entry for entry in service.log_entries() if entry.get("message") == "ready"]
    assert len(starts) == 1, "the service started more than once"
    crashes = {"download crashed", "unhandled error"}
    assert not [e for e in service.log_entries() if e.get("message") in crashes]
