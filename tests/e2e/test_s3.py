"""End-to-end S3 storage: a real `serve` process, a media server and SeaweedFS, all on loopback."""

from __future__ import annotations

import hashlib
import json
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from receiver import tokens
from tests.media_server import MediaServer, media_bytes
from tests.s3_server import SeaweedS3
from tests.support import Service, succeed_payload, wait_for

pytestmark = pytest.mark.e2e

T2V = "videos/text2video"
MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def prefix() -> str:
    """A prefix of this test's own in the session's bucket."""
    return f"e2e-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def spawn(services: Callable[..., Service], s3: SeaweedS3, prefix: str) -> Callable[..., Service]:
    """Start a service that downloads into the bucket under `prefix`; env overrides merge in."""

    def start(ready: bool = True, **env: str) -> Service:
        settings = {
            "STORAGE_URL": f"s3://{s3.bucket}/{prefix}",
            "S3_ENDPOINT_URL": s3.endpoint_url,
            "S3_PATH_STYLE": "true",
            "S3_ALLOW_HTTP": "true",
            "S3_PART_SIZE": str(5 * MiB),
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_REGION": s3.region,
            "ALLOW_PRIVATE_DOWNLOADS": "true",
            "DOWNLOAD_RETRY_BASE_SECONDS": "0.05",
            "DOWNLOAD_CONCURRENCY": "2",
        }
        return services(ready=ready, env=settings | env)

    return start


def deliver(service: Service, task_id: str, urls: list[str]) -> None:
    """A succeed callback for a new task naming these video URLs."""
    external = f"kr_{task_id}"
    body = succeed_payload(task_id, urls, T2V) | {"task_info": {"external_task_id": external}}
    url = service.callback_url(tokens.task_ref(external), T2V)
    response = httpx.post(url, json=body, trust_env=False)
    assert response.status_code == 200, response.text


def s3_object(s3: SeaweedS3, key: str) -> httpx.Response:
    response = s3.request("GET", f"{s3.bucket}/{key}", timeout=30)
    assert response.status_code == 200, (key, response.status_code, response.text[:300])
    return response


def readyz(service: Service) -> httpx.Response:
    return httpx.get(service.base_url + "/readyz", trust_env=False)


def storage_problem(service: Service) -> str:
    """The reason /readyz gives once it reports the storage, checked to be what the log said."""
    wait_for(lambda: readyz(service).status_code == 503, "/readyz to report the storage")
    reason: str = readyz(service).json()["reason"]
    warnings = [e for e in service.log_entries() if e.get("message", "").startswith("storage")]
    assert warnings and warnings[0]["reason"] == reason
    return reason


def deliver_and_see_it_wait(
    service: Service, media: MediaServer, task_id: str, path: str, body: bytes
) -> None:
    """Deliver a task with one video; a second later it is still queued, never fetched."""
    deliver(service, task_id, [media.add(path, body)])
    time.sleep(1.0)  # twenty idle ticks of the workers, had they been claiming
    (waiting,) = service.task(task_id)["assets"]
    assert (waiting["state"], waiting["attempts"]) == ("pending", 0)
    assert media.hits(path) == []


def test_task_lands_in_the_bucket_and_is_archived(
    spawn: Callable[..., Service], media: MediaServer, s3: SeaweedS3, prefix: str
) -> None:
    """Callback -> a multipart video and a one-PUT video in S3, with metadata and sidecars."""
    service = spawn()
    big = media_bytes(12 * MiB, 51)  # over S3_PART_SIZE: a multipart upload
    small = media_bytes(300_000, 52)  # one PUT
    urls = [media.add("/s3/big.mp4", big), media.add("/s3/small.mp4", small)]

    deliver(service, "s3task", urls)
    wait_for(service.archived("s3task"), "the task to be archived", 30)

    assets = service.task("s3task")["assets"]
    for asset, body in zip(assets, (big, small), strict=True):
        key = f"{prefix}/{T2V}/s3task/{asset['index']}.mp4"
        assert asset["state"] == "stored"
        assert asset["location"] == f"s3://{s3.bucket}/{key}"
        assert (asset["sha256"], asset["size"]) == (sha(body), len(body))
        stored = s3_object(s3, key)
        assert sha(stored.content) == sha(body)
        assert stored.headers["content-type"] == "video/mp4"
        assert stored.headers["x-amz-meta-sha256"] == sha(body)
        sidecar: dict[str, Any] = s3_object(s3, key + ".json").json()
        assert (sidecar["task_id"], sidecar["sha256"], sidecar["size"]) == (
            "s3task",
            sha(body),
            len(body),
        )
        assert sidecar["source_url"] == urls[asset["index"]]
    etags = [s3_object(s3, f"{prefix}/{T2V}/s3task/{n}.mp4").headers["etag"] for n in (0, 1)]
    assert "-" in etags[0] and "-" not in etags[1]  # multipart, then a single PUT
    assert s3.list_multipart_uploads(prefix=prefix) == []

    link = httpx.get(
        service.base_url + "/api/tasks/s3task/assets/0/url",
        params={"expires_in": "60"},
        headers=service.admin,
        trust_env=False,
    )
    assert link.status_code == 200, link.text
    presigned = link.json()["url"]
    assert presigned.startswith(f"{s3.endpoint_url}/{s3.bucket}/{prefix}/")
    opened = httpx.get(presigned, trust_env=False, timeout=30)
    assert opened.status_code == 200
    assert sha(opened.content) == sha(big)

    assert service.stop(signal.SIGTERM) == 0


def test_wrong_credentials_wait_then_store_once_fixed(
    spawn: Callable[..., Service], media: MediaServer, s3: SeaweedS3
) -> None:
    """Wrong credentials: /readyz and the log say what to fix, assets wait; fixed, they store."""
    service = spawn(ready=False, AWS_SECRET_ACCESS_KEY="not-the-secret")
    reason = storage_problem(service)
    assert "refused the credentials" in reason and "AWS_SECRET_ACCESS_KEY" in reason

    body = media_bytes(200_000, 53)
    deliver_and_see_it_wait(service, media, "s3wait", "/s3/wait.mp4", body)

    service.extra_env["AWS_SECRET_ACCESS_KEY"] = s3.secret_key
    service.restart()
    wait_for(service.archived("s3wait"), "the waiting asset to be stored", 30)
    (stored,) = service.task("s3wait")["assets"]
    assert stored["sha256"] == sha(body)
    assert sha(s3_object(s3, stored["location"].split("/", 3)[3]).content) == sha(body)
    assert readyz(service).json() == {"status": "ready"}


def test_forced_recheck_does_not_upload_again(
    spawn: Callable[..., Service], media: MediaServer, s3: SeaweedS3, prefix: str
) -> None:
    """`retry --force` of a stored S3 asset downloads and compares it, and leaves the object be."""
    service = spawn()
    body = media_bytes(6 * MiB, 54)
    url = media.add("/s3/again.mp4", body)
    deliver(service, "s3again", [url])
    wait_for(service.archived("s3again"), "the first store", 30)
    key = f"{prefix}/{T2V}/s3again/0.mp4"
    before = s3_object(s3, key).headers
    sidecar = s3_object(s3, key + ".json").content  # its stored_at (ms) changes on any re-store

    forced = httpx.post(
        service.base_url + "/api/tasks/s3again/retry",
        params={"force": "true"},
        headers=service.admin,
        trust_env=False,
    )
    assert forced.status_code in (200, 202), forced.text
    wait_for(lambda: len(media.hits("/s3/again.mp4")) == 2, "the re-check download", 20)
    wait_for(service.archived("s3again"), "the re-check to settle", 20)

    (asset,) = service.task("s3again")["assets"]
    assert (asset["state"], asset["sha256"]) == ("stored", sha(body))
    after = s3_object(s3, key).headers
    assert (after["etag"], after["last-modified"]) == (before["etag"], before["last-modified"])
    assert s3_object(s3, key + ".json").content == sidecar
    assert json.loads(sidecar)["sha256"] == sha(body)


def test_missing_bucket_waits_then_stores_once_created(
    spawn: Callable[..., Service], media: MediaServer, s3: SeaweedS3
) -> None:
    """A bucket that does not exist: /readyz and the log name it, assets wait; once it is
    created, they are stored without a restart."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    service = spawn(ready=False, STORAGE_URL=f"s3://{bucket}/e2e", STORAGE_CHECK_SECONDS="0.5")
    assert storage_problem(service) == (
        f"bucket {bucket} does not exist at {s3.endpoint_url}: create it, or correct STORAGE_URL"
    )

    body = media_bytes(7 * MiB, 55)  # over S3_PART_SIZE: a multipart upload
    deliver_and_see_it_wait(service, media, "s3bucket", "/s3/bucket.mp4", body)

    s3.create_bucket(bucket)
    wait_for(service.archived("s3bucket"), "the waiting asset to be stored", 30)
    (stored,) = service.task("s3bucket")["assets"]
    assert stored["location"] == f"s3://{bucket}/e2e/{T2V}/s3bucket/0.mp4"
    object_ = s3.request("GET", f"{bucket}/e2e/{T2V}/s3bucket/0.mp4", timeout=30)
    assert sha(object_.content) == sha(body) == stored["sha256"]
    assert readyz(service).json() == {"status": "ready"}
    assert service.stop(signal.SIGTERM) == 0
