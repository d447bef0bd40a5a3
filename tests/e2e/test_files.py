"""End-to-end: the files a real `serve` process keeps are private to its user."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from receiver import tokens
from tests.media_server import MediaServer
from tests.support import Service, succeed_payload, wait_for

pytestmark = pytest.mark.e2e

T2V = "videos/text2video"
# An mp4's first box, so the bytes look like the video they are said to be.
VIDEO = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(200_000)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Processes started inside inherit this umask (the usual 022 of a login shell)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_directory_database_secrets_and_media_are_private(
    services: Callable[..., Service], media: MediaServer, tmp_path: Path
) -> None:
    """Under umask 022, old files are narrowed and new ones made private: 0700 and 0600."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    database = data_dir / "kling-receiver.db"
    with umask(0o022), sqlite3.connect(database) as conn:  # a database an earlier start left
        conn.execute("PRAGMA journal_mode=wal")
    assert mode(database) == 0o644

    downloads = {"ALLOW_PRIVATE_DOWNLOADS": "true", "DOWNLOAD_CONCURRENCY": "1"}
    with umask(0o022):
        service = services(env=downloads, secrets_in_env=False)
    url = media.add("/private/a.mp4", VIDEO)
    payload = succeed_payload("private1", [url], T2V)
    payload["task_info"] = {"external_task_id": "kr_private_1"}
    callback = service.callback_url(tokens.task_ref("kr_private_1"), T2V)
    delivered = httpx.post(callback, content=json.dumps(payload), trust_env=False)
    assert delivered.status_code == 200, delivered.text
    wait_for(service.archived("private1"), "the task to be archived")

    (asset,) = service.task("private1")["assets"]
    stored = Path(asset["location"])
    files = [
        database,
        Path(f"{database}-wal"),
        Path(f"{database}-shm"),
        service.secrets_path,
        data_dir / ".secrets.lock",
        stored,
        Path(f"{stored}.json"),
    ]
    assert {path.name: mode(path) for path in files} == {path.name: 0o600 for path in files}
    folders = [data_dir, *(parent for parent in stored.parents if data_dir in parent.parents)]
    assert {str(path): mode(path) for path in folders} == {str(path): 0o700 for path in folders}
