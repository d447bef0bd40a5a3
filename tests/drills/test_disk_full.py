"""Drill: the disk fills up while a file is being written.

The asset must stay queued with a reason a person can act on, nothing corrupt may be
left (a hidden `.part` kept to resume from is fine), and the file must complete once
there is room again. The full disk is simulated with RLIMIT_FSIZE (every CI can do it:
writes past the limit fail with EFBIG), and, where this process may mount filesystems,
also with a real small tmpfs (ENOSPC).
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver import tokens
from tests.media_server import MediaServer, media_bytes
from tests.support import Service, succeed_payload, wait_for

pytestmark = pytest.mark.e2e

T2V = "videos/text2video"
MiB = 1 << 20
ENV = {
    "ALLOW_PRIVATE_DOWNLOADS": "true",
    "DOWNLOAD_CONCURRENCY": "1",
    "DOWNLOAD_RETRY_BASE_SECONDS": "0.2",
    "DOWNLOAD_LEASE_SECONDS": "2",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def deliver(service: Service, task_id: str, url: str) -> None:
    external = f"kr_{task_id}"
    data = succeed_payload(task_id, [url], T2V)
    data["task_info"] = {"external_task_id": external}
    response = httpx.post(
        service.callback_url(tokens.task_ref(external), T2V),
        content=json.dumps(data).encode(),
        headers={"content-type": "application/json"},
        trust_env=False,
    )
    assert response.status_code == 200, response.text


def asset(service: Service, task_id: str) -> dict[str, Any]:
    (found,) = service.task(task_id)["assets"]
    assert isinstance(found, dict)
    return found


def files(root: Path) -> dict[str, int]:
    """Every file under root, relative name -> size."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def failed_attempts(service: Service, task_id: str, count: int) -> Callable[[], bool]:
    def check() -> bool:
        found = asset(service, task_id)
        assert found["state"] in ("pending", "downloading"), found
        return bool(found["attempts"] >= count and found["error"])

    return check


def test_file_too_large_for_the_disk_stays_queued_then_completes(
    services: Callable[..., Service], media: MediaServer
) -> None:
    """RLIMIT_FSIZE of 1 MiB, a 3 MiB file: queued with the reason; stored once unlimited."""
    body = media_bytes(3 * MiB, 27)
    url = media.add("/full/a.mp4", body)
    service = services(env=ENV, rlimits={resource.RLIMIT_FSIZE: MiB})
    root = service.data_dir / "assets"
    task_dir = root / T2V / "full"

    deliver(service, "full", url)
    wait_for(failed_attempts(service, "full", 2), "two attempts that hit the limit", 20)

    held = asset(service, "full")
    print(f"the API says, with the limit: {held}")
    print(f"/readyz says: {httpx.get(service.base_url + '/readyz', trust_env=False).text}")
    assert held["state"] == "pending"
    assert "file size limit" in held["error"] and "EFBIG" in held["error"], held["error"]
    assert held["error"].endswith("(will try again)"), held["error"]
    assert held["location"] is None and held["sha256"] is None
    # Only the hidden part, a true prefix of the file, and the note of its ETag.
    assert sorted(files(root)) == [f"{T2V}/full/.0.part", f"{T2V}/full/.0.part.json"]
    assert files(root)[f"{T2V}/full/.0.part"] == MiB
    assert body.startswith((task_dir / ".0.part").read_bytes())
    # The limit hit the asset alone: the ledger's files stayed well below it.
    ledger = {p.name: p.stat().st_size for p in service.data_dir.glob("kling-receiver.db*")}
    assert max(ledger.values()) < MiB // 2, ledger

    service.stop(signal.SIGTERM)
    service.rlimits = {}
    service.start()
    wait_for(service.archived("full"), "the download to complete without the limit", 20)

    stored = asset(service, "full")
    assert (stored["state"], stored["sha256"], stored["size"]) == ("stored", sha(body), len(body))
    assert stored["error"] is None
    assert Path(stored["location"]).read_bytes() == body
    assert sorted(files(root)) == [f"{T2V}/full/0.mp4", f"{T2V}/full/0.mp4.json"]
    assert media.hits("/full/a.mp4")[-1].headers["Range"] == f"bytes={MiB}-"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, if this process may mount one (root in most CI containers)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (RLIMIT_FSIZE covers the drill): {made.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_without_space_pauses_downloads_until_space_is_freed(
    services: Callable[..., Service], media: MediaServer, small_disk: Path
) -> None:
    """A real full disk (ENOSPC) mid-file: the file waits, queued, and downloads pause
    (/readyz says why); once space is freed the storage check (STORAGE_CHECK_SECONDS) resumes
    it, with no restart."""
    body = media_bytes(24 * MiB, 28)
    url = media.add("/nospace/a.mp4", body)
    filler = small_disk / "filler"
    # 20 MiB free: above the 16 MiB the storage check wants, below the 24 MiB file.
    filler.write_bytes(bytes(shutil.disk_usage(small_disk).free - 20 * MiB))
    env = {"STORAGE_URL": str(small_disk / "assets"), "STORAGE_CHECK_SECONDS": "1"}
    service = services(env=ENV | env)
    task_dir = small_disk / "assets" / T2V / "nospace"

    deliver(service, "nospace", url)
    wait_for(failed_attempts(service, "nospace", 1), "an attempt that found no space", 20)

    held = asset(service, "nospace")
    ready = httpx.get(service.base_url + "/readyz", trust_env=False)
    print(f"the API says, with the disk full: {held}")
    print(f"/readyz says: {ready.status_code} {ready.text}")
    assert held["state"] == "pending"
    assert "the disk is full" in held["error"], held["error"]
    assert (ready.status_code, ready.json()["status"]) == (503, "unavailable")
    assert "full" in ready.json()["reason"], ready.text
    assert sorted(p.name for p in task_dir.iterdir()) == [".0.part", ".0.part.json"]
    part = (task_dir / ".0.part").read_bytes()
    assert 16 * MiB < len(part) < len(body) and body.startswith(part)

    filler.unlink()
    wait_for(service.archived("nospace"), "the download to complete once space is back", 30)

    stored = asset(service, "nospace")
    assert (stored["state"], stored["sha256"], stored["size"]) == ("stored", sha(body), len(body))
    assert Path(stored["location"]).read_bytes() == body
    assert sorted(p.name for p in task_dir.iterdir()) == ["0.mp4", "0.mp4.json"]
    assert media.hits("/nospace/a.mp4")[-1].headers["Range"] == f"bytes={len(part)}-"
    assert httpx.get(service.base_url + "/readyz", trust_env=False).status_code == 200


def test_disk_full_at_the_sidecar_leaves_nothing_under_the_final_name(
    services: Callable[..., Service], media: MediaServer, small_disk: Path
) -> None:
    """The disk fills up after the file's last byte, as its JSON sidecar is written.

    tmpfs counts whole 4 KiB pages and nothing for directories or empty files, so the
    free space can be set to exactly the file plus the one page of its `.part.json`
    note: the file fits, the sidecar does not. While the asset is queued nothing may be
    visible under its final name (storage/local.py: "nothing partial is ever visible
    under a final name"); once space is back (and the service restarted, which saves the
    15 s wait for the storage recheck) it completes, with nothing left over.
    """
    body = media_bytes(20 * MiB, 29)
    url = media.add("/sidecar/a.mp4", body)
    filler = small_disk / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(small_disk).free - len(body) - 4096))
    service = services(env=ENV | {"STORAGE_URL": str(small_disk / "assets")})
    task_dir = small_disk / "assets" / T2V / "sidecar"

    deliver(service, "sidecar", url)
    wait_for(failed_attempts(service, "sidecar", 1), "an attempt that found no space", 20)

    held = asset(service, "sidecar")
    print(f"the API says, with the disk full: {held}")
    assert held["state"] == "pending"
    assert "the disk is full" in held["error"], held["error"]
    left_while_queued = sorted(p.name for p in task_dir.iterdir())
    visible_while_queued = [name for name in left_while_queued if not name.startswith(".")]
    print(f"files while the asset is queued: {left_while_queued}")

    filler.unlink()
    service.stop(signal.SIGTERM)  # a start checks the storage at once, not in 15 s
    service.start()
    wait_for(service.archived("sidecar"), "the download to complete once space is back", 20)

    stored = asset(service, "sidecar")
    assert (stored["state"], stored["sha256"], stored["size"]) == ("stored", sha(body), len(body))
    assert Path(stored["location"]).read_bytes() == body
    assert sorted(p.name for p in task_dir.iterdir()) == ["0.mp4", "0.mp4.json"]
    print(f"fetches, by Range: {[r.headers.get('Range') for r in media.hits('/sidecar/a.mp4')]}")
    assert visible_while_queued == [], (
        f"while the asset was pending ({held['error']!r}) these were visible: {left_while_queued}"
    )
