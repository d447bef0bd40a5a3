"""Drill: SIGKILL the service at random moments while deliveries and downloads stream in.

After the last restart, every delivery the service acknowledged (2xx) must be in the
ledger, and every file of every succeeded task stored exactly once, with the right bytes.
The kill schedule and the tasks come from one seed, printed; KILL_DRILL_SEED repeats it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver import tokens
from tests.media_server import MediaServer, Serve, media_bytes
from tests.support import Service, succeed_payload, wait_for

pytestmark = pytest.mark.e2e

T2V = "videos/text2video"
IMAGES = "images/generations"
JSON = {"content-type": "application/json"}
KILLS = 10
ENV = {
    "ALLOW_PRIVATE_DOWNLOADS": "true",
    "DOWNLOAD_RETRY_BASE_SECONDS": "0.05",
    "DOWNLOAD_CONCURRENCY": "3",
    # Leases of a killed process must run out soon for its jobs to be taken again.
    "DOWNLOAD_LEASE_SECONDS": "3",
}
RANK = {"submitted": 0, "processing": 1, "succeed": 2, "failed": 2}
TERMINAL = {"succeed", "failed"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Delivery:
    task_id: str
    status: str
    url: str
    body: bytes


@dataclass
class Stream:
    """A stream of distinct tasks delivered one callback after another, from a thread.

    Each task is one of: submitted, processing, succeed (files on `media`, some slowed so
    that kills land mid-download); succeed sent twice; submitted then failed; processing
    only. A delivery that meets a dead service is sent again for up to `patience` seconds,
    as Kling would; only those answered 2xx count as acknowledged.
    """

    service: Service
    media: MediaServer
    rng: random.Random
    patience: float = 3.0
    acked: list[Delivery] = field(default_factory=list)
    sources: dict[str, bytes] = field(default_factory=dict)  # asset URL -> its bytes
    outcomes: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0  # attempts that met a dead or dying service
    given_up: int = 0  # deliveries never acknowledged
    answered_badly: list[tuple[Delivery, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=10, trust_env=False) as client:
                number = 0
                while not self.stop.is_set():
                    for delivery in self.task(number):
                        self.send(client, delivery)
                    number += 1
                    time.sleep(self.rng.uniform(0.05, 0.2))
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.failure = exc

    def send(self, client: httpx.Client, delivery: Delivery) -> None:
        deadline = time.monotonic() + self.patience
        while True:
            try:
                response = client.post(delivery.url, content=delivery.body, headers=JSON)
            except httpx.TransportError:
                self.unanswered += 1
                if time.monotonic() > deadline or self.stop.is_set():
                    self.given_up += 1
                    return
                time.sleep(0.1)
                continue
            if response.is_success:
                self.acked.append(delivery)
                self.outcomes[response.json()["outcome"]] += 1
            else:
                self.answered_badly.append((delivery, response.status_code, response.text))
            return

    def task(self, number: int) -> list[Delivery]:
        rng = self.rng
        task_id, external = f"kd{number}", f"kr_kd_{number}"
        action = IMAGES if number % 3 == 0 else T2V
        url = self.service.callback_url(tokens.task_ref(external), action)
        created = 1_764_043_200_000 + number * 10_000

        def body(status: str, step: int, **fields: Any) -> Delivery:
            data = {
                "task_id": task_id,
                "task_status": status,
                "task_status_msg": "",
                "created_at": created,
                "updated_at": created + step,
                "task_info": {"external_task_id": external},
                **fields,
            }
            return Delivery(task_id, status, url, json.dumps(data).encode())

        plan = rng.choices(["lifecycle", "twice", "failed", "open"], weights=[5, 3, 1, 1])[0]
        if plan == "failed":
            return [body("submitted", 0), body("failed", 2000, task_status_msg="refused")]
        if plan == "open":
            return [body("processing", 1000)]
        data = succeed_payload(task_id, self.files(number, action), action)
        data |= {"created_at": created, "updated_at": created + 3000}
        data["task_info"] = {"external_task_id": external}
        succeed = Delivery(task_id, "succeed", url, json.dumps(data).encode())
        if plan == "twice":
            return [succeed, succeed]
        return [body("submitted", 0), body("processing", 1000), succeed]

    def files(self, number: int, action: str) -> list[str]:
        """1 or 2 files of 100 KB to 2 MB (log-uniform) on the media server; a third slowed."""
        rng = self.rng
        image = action == IMAGES
        content_type = "image/png" if image else "video/mp4"
        urls = []
        for index in range(rng.choice([1, 2])):
            size = int(math.exp(rng.uniform(math.log(100_000), math.log(2_000_000))))
            data = media_bytes(size, rng.randbytes(8), "png" if image else "mp4")
            rate = rng.choice([1 << 20, 2 << 20]) if rng.random() < 0.35 else None
            path = f"/kd/{number}/{index}.{'png' if image else 'mp4'}"
            url = self.media.add(path, data, [Serve(rate=rate, content_type=content_type)])
            self.sources[url] = data
            urls.append(url)
        return urls


def all_tasks(service: Service) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 200} | ({"cursor": cursor} if cursor else {})
        page = service.api("/api/tasks", **params).json()
        tasks += page["tasks"]
        cursor = page["next_cursor"]
        if not cursor:
            return tasks


def succeeded_unarchived(service: Service) -> Callable[[], bool]:
    def check() -> bool:
        page = service.api("/api/tasks", status="succeed", archived="false", limit=1).json()
        return not page["tasks"]

    return check


def visible_files(root: Path) -> list[Path]:
    return sorted(
        p.resolve() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
    )


def hidden_files(root: Path) -> list[Path]:
    """`.part` files, their notes, sidecars being written: none may be left at the end."""
    return sorted(p for p in root.rglob(".*") if p.is_file())


def test_sigkill_at_random_moments_loses_no_delivery_and_no_file(
    services: Callable[..., Service], media: MediaServer
) -> None:
    """10 SIGKILLs 0.2-1.5 s apart amid deliveries and downloads, a restart after each.

    Then: every acknowledged delivery is recorded verbatim and its task is at least at
    its status; every file of every succeeded task is stored once, bytes, sha256 and
    sidecar right; nothing else is in the storage directory, hidden or not.
    """
    seed = int(os.environ.get("KILL_DRILL_SEED") or random.randrange(1 << 32))
    print(f"kill drill seed {seed}: KILL_DRILL_SEED={seed} repeats its tasks and kill schedule")
    service = services(env=ENV)
    root = service.data_dir / "assets"
    stream = Stream(service, media, random.Random(f"{seed}/tasks"))
    delivering = threading.Thread(target=stream.run, name="deliveries", daemon=True)
    schedule = random.Random(f"{seed}/kills")

    delivering.start()
    writing_at_kill = []
    try:
        for _ in range(KILLS):
            time.sleep(schedule.uniform(0.2, 1.5))
            writing_at_kill.append(len([p for p in hidden_files(root) if p.suffix == ".part"]))
            service.restart()
    finally:
        stream.stop.set()
        delivering.join(30)
    assert stream.failure is None, f"seed {seed}: the delivery thread broke: {stream.failure!r}"
    print(
        f"{len(stream.acked)} deliveries acknowledged {dict(stream.outcomes)}, "
        f"{stream.given_up} never were ({stream.unanswered} attempts met a dead service); "
        f"{len(stream.sources)} files; .part files on disk at each kill: {writing_at_kill}"
    )
    assert stream.answered_badly == [], f"seed {seed}: deliveries answered with an error"
    assert stream.outcomes["moved"] > 20, f"seed {seed}: too few deliveries to mean anything"
    assert sum(writing_at_kill) > 0, f"seed {seed}: no kill landed during a download"

    wait_for(succeeded_unarchived(service), f"seed {seed}: every succeeded task archived", 60)

    tasks = {task["task_id"]: task for task in all_tasks(service)}
    for delivery in stream.acked:
        task = tasks.get(delivery.task_id)
        assert task is not None, f"seed {seed}: acknowledged {delivery.task_id} is not recorded"
        if delivery.status in TERMINAL:
            assert task["status"] == delivery.status, (seed, delivery.task_id)
        else:
            assert RANK[task["status"]] >= RANK[delivery.status], (seed, delivery.task_id)
    acked_bodies: dict[str, set[bytes]] = {}
    for delivery in stream.acked:
        acked_bodies.setdefault(delivery.task_id, set()).add(delivery.body)
    for task_id, bodies in acked_bodies.items():
        events = service.api(f"/api/tasks/{task_id}/events").json()["events"]
        recorded = {event["body"].encode() for event in events}
        assert bodies <= recorded, f"seed {seed}: an acknowledged body of {task_id} is missing"

    locations = []
    for task in tasks.values():
        if task["status"] != "succeed":
            assert task["assets"] == [], (seed, task["task_id"])
            continue
        assert task["archived"], (seed, task["task_id"])
        assert task["assets"], (seed, task["task_id"])
        for asset in task["assets"]:
            source = stream.sources[asset["url"]]
            assert asset["state"] == "stored", (seed, task["task_id"], asset)
            assert (asset["sha256"], asset["size"]) == (sha(source), len(source)), (seed, asset)
            stored = Path(asset["location"])
            assert stored.is_relative_to(root.resolve()), (seed, asset)
            assert sha(stored.read_bytes()) == sha(source), f"seed {seed}: {stored} is corrupt"
            sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
            assert (sidecar["sha256"], sidecar["size"]) == (sha(source), len(source)), seed
            assert sidecar["source_url"] == asset["url"], seed
            locations += [stored, stored.with_name(stored.name + ".json")]
    acked_files = {
        file["url"]
        for delivery in stream.acked
        if delivery.status == "succeed"
        for files in json.loads(delivery.body)["task_result"].values()
        for file in files
    }
    recorded_files = {a["url"] for t in tasks.values() for a in t["assets"]}
    assert acked_files <= recorded_files, f"seed {seed}: files of acknowledged tasks are missing"
    # One file (and its sidecar) per asset key, nothing else, and nothing half-written.
    assert visible_files(root) == sorted(locations), f"seed {seed}: stray or missing files"
    assert hidden_files(root) == [], f"seed {seed}: leftovers"
    errors = [
        f"{entry['message']}: {entry.get('exception', '').strip().splitlines()[-1:]}"
        for entry in service.log_entries()
        if entry.get("level") in ("error", "critical")
    ]
    assert not errors, f"seed {seed}: the service logged errors:\n" + "\n".join(errors)
