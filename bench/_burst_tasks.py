"""The burst's tasks: small images served by nginx, one URL (hard link) per task.

Shared by the burst (`bench.burst`) and the worker benchmark (`bench.workers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tests.media_server import STARTS

__all__ = ["ACTION", "MAX_SIZE", "MIN_SIZE", "Asset", "Task", "make_tasks"]

ACTION = "images/generations"
MIN_SIZE = 20 << 10
MAX_SIZE = 100 << 10


@dataclass(frozen=True, slots=True)
class Asset:
    """One served file: its size and sha256."""

    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Task:
    """One task of the burst and the one image its succeed callback names."""

    task_id: str
    external_task_id: str
    url: str
    asset: Asset

    @property
    def key(self) -> str:
        """Where the service stores the image: `action/task_id/index.ext`."""
        return f"{ACTION}/{self.task_id}/0.png"

    def body(self, now_ms: int) -> bytes:
        """The succeed callback Kling would send, as bytes."""
        data = {
            "task_id": self.task_id,
            "task_status": "succeed",
            "task_status_msg": "",
            "created_at": now_ms - 30_000,
            "updated_at": now_ms,
            "task_info": {"external_task_id": self.external_task_id},
            "task_result": {"images": [{"index": 0, "url": self.url}]},
        }
        return json.dumps(data).encode()


def _make_assets(folder: Path, files: int, rng: random.Random) -> list[tuple[str, Asset]]:
    """Images of random sizes, a PNG's start then random bytes, fsynced; their names and what
    they hold."""
    folder.mkdir(parents=True)
    made = []
    for number in range(files):
        data = STARTS["png"] + os.urandom(rng.randint(MIN_SIZE, MAX_SIZE) - len(STARTS["png"]))
        name = f"{number:04d}.png"
        (folder / name).write_bytes(data)
        made.append((name, Asset(len(data), hashlib.sha256(data).hexdigest())))
    os.sync()
    return made


def make_tasks(www: Path, base_url: str, count: int, rng: random.Random, files: int) -> list[Task]:
    """One task per hard link www/t/<n>.png to one of `files` sources: one URL per task."""
    sources = _make_assets(www / "src", files, rng)
    links = www / "t"
    links.mkdir()
    tasks = []
    for number in range(count):
        name, asset = sources[number % len(sources)]
        os.link(www / "src" / name, links / f"{number:06d}.png")
        tasks.append(
            Task(
                task_id=f"burst{number:06d}",
                external_task_id=f"bx{number:06d}",
                url=f"{base_url}/t/{number:06d}.png",
                asset=asset,
            )
        )
    return tasks
