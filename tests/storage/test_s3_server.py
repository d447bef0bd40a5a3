"""Smoke tests: the `s3` fixture is a real SeaweedFS S3 gateway, and obstore works against it.

They pin down what the S3 sink will rely on: streamed multipart puts from sync and async
iterators, abort of the multipart upload when the source fails, refused credentials,
presigned GETs, and object attributes (Content-Type, user metadata) round-tripping.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import obstore
import pytest
from obstore.exceptions import PermissionDeniedError
from obstore.store import S3Store

from tests.s3_server import SeaweedS3

MiB = 1024 * 1024
PART = 5 * MiB  # the smallest part S3 accepts (but the last)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def s3_store(s3: SeaweedS3, **overrides: str) -> S3Store:
    """An obstore S3Store on the test bucket, with explicit credentials (so no env or IMDS)."""
    return S3Store(
        s3.bucket, **{**s3.obstore_config(), **overrides}, client_options={"allow_http": True}
    )


@pytest.fixture
def store(s3: SeaweedS3) -> S3Store:
    """An obstore S3Store on the session server's bucket."""
    return s3_store(s3)


@pytest.fixture
def key() -> Callable[[str], str]:
    """Keys unique to this test, so tests share the session's bucket safely."""
    base = f"smoke/{uuid.uuid4().hex}"
    return lambda name: f"{base}/{name}"


def chunks(
    count: int,
    size: int,
    *,
    fail_at: int | None = None,
    before_fail: Callable[[], None] | None = None,
) -> Iterator[bytes]:
    """`count` distinct chunks of `size` bytes; at index `fail_at`, call `before_fail` and raise."""
    for i in range(count):
        if i == fail_at:
            if before_fail is not None:
                before_fail()
            raise RuntimeError("source failed midway")
        yield bytes([i % 256]) * size


def expected_sha256(count: int, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in chunks(count, size):
        digest.update(chunk)
    return digest.hexdigest()


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                found.add((address, int(port, 16)))
    return found


def test_server_listens_on_loopback_only(s3: SeaweedS3) -> None:
    """Every port weed listens on is one we chose, on 127.0.0.1 only."""
    assert s3.process is not None and s3.process.poll() is None
    assert s3.endpoint_url == f"http://127.0.0.1:{s3.ports['s3.port']}"
    wanted = {("0100007F", port) for port in s3.ports.values()}  # 0100007F: 127.0.0.1
    deadline = time.monotonic() + 10  # the admin server may still be coming up
    while (listening := listening_addresses(s3.process.pid)) != wanted:
        if time.monotonic() > deadline or not listening <= wanted:
            break
        time.sleep(0.05)
    assert listening == wanted
    assert s3.startup_seconds is not None and s3.startup_seconds < 15


def test_server_refuses_anonymous_and_wrong_secret(s3: SeaweedS3) -> None:
    """Only the configured identity gets in: anonymous, unknown key and bad secret get 403."""
    assert s3.request("GET", s3.bucket).status_code == 200
    anonymous = httpx.get(f"{s3.endpoint_url}/{s3.bucket}", trust_env=False)
    assert anonymous.status_code == 403
    wrong_secret = s3.request("GET", s3.bucket, secret_key="not-the-secret")
    assert wrong_secret.status_code == 403
    assert b"SignatureDoesNotMatch" in wrong_secret.content
    unknown_key = s3.request("GET", s3.bucket, access_key="nobody")
    assert unknown_key.status_code == 403
    assert b"InvalidAccessKeyId" in unknown_key.content


def test_create_bucket_gives_an_empty_usable_bucket(s3: SeaweedS3) -> None:
    """s3.create_bucket() makes a fresh bucket that obstore can write to and list."""
    bucket = s3.create_bucket()
    fresh = S3Store(bucket, **s3.obstore_config(), client_options={"allow_http": True})
    assert obstore.list(fresh).collect() == []
    obstore.put(fresh, "only.txt", b"1")
    assert [meta["path"] for meta in obstore.list(fresh).collect()] == ["only.txt"]


def test_put_get_bytes(store: S3Store, key: Callable[[str], str]) -> None:
    """obstore.put of bytes lands whole: get, head and list see it, and delete removes it."""
    path = key("hello.txt")
    result = obstore.put(store, path, b"hello, s3")
    assert result["e_tag"]
    assert obstore.get(store, path).bytes() == b"hello, s3"
    assert obstore.head(store, path)["size"] == 9
    assert [meta["path"] for meta in obstore.list(store, key("")).collect()] == [path]
    obstore.delete(store, path)
    with pytest.raises(FileNotFoundError):
        obstore.head(store, path)


def test_multipart_put_from_sync_iterator(store: S3Store, key: Callable[[str], str]) -> None:
    """40 MiB from a sync iterator of 8 MiB chunks goes up as 5 parts and reads back intact."""
    path = key("big.mp4")
    result = obstore.put(
        store,
        path,
        chunks(5, 8 * MiB),
        chunk_size=8 * MiB,
        max_concurrency=2,
        attributes={"Content-Type": "video/mp4"},
    )
    assert result["e_tag"] is not None and result["e_tag"].endswith('-5"')  # 5 parts
    got = obstore.get(store, path)
    assert got.meta["size"] == 40 * MiB
    assert got.attributes["Content-Type"] == "video/mp4"
    digest = hashlib.sha256()
    for block in got.stream(min_chunk_size=4 * MiB):
        digest.update(block)
    assert digest.hexdigest() == expected_sha256(5, 8 * MiB)


def wait_for_open_upload(s3: SeaweedS3, path: str) -> Callable[[], None]:
    """A `before_fail` that waits (5 s at most) until the upload of `path` is listed as open."""

    def wait() -> None:
        deadline = time.monotonic() + 5
        while s3.list_multipart_uploads(prefix=path) != [path] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s3.list_multipart_uploads(prefix=path) == [path], "no multipart upload opened"

    return wait


def test_failing_iterator_aborts_multipart_upload(
    s3: SeaweedS3, store: S3Store, key: Callable[[str], str]
) -> None:
    """A source that raises midway propagates, and leaves neither an object nor an open upload."""
    path = key("broken.bin")
    source = chunks(5, PART, fail_at=3, before_fail=wait_for_open_upload(s3, path))
    with pytest.raises(RuntimeError, match="source failed midway"):
        obstore.put(store, path, source, chunk_size=PART)
    assert s3.list_multipart_uploads(prefix=path) == []
    with pytest.raises(FileNotFoundError):
        obstore.head(store, path)


def test_wrong_credentials_raise_permission_denied(
    s3: SeaweedS3, store: S3Store, key: Callable[[str], str]
) -> None:
    """A wrong secret or unknown key makes obstore raise PermissionDeniedError naming the cause."""
    path = key("guarded.txt")
    obstore.put(store, path, b"secret")
    bad_secret = s3_store(s3, secret_access_key="not-the-secret")
    with pytest.raises(PermissionDeniedError, match="SignatureDoesNotMatch"):
        obstore.get(bad_secret, path)
    with pytest.raises(PermissionDeniedError, match="SignatureDoesNotMatch"):
        obstore.put(bad_secret, key("intruder.txt"), b"nope")
    with pytest.raises(PermissionDeniedError, match="InvalidAccessKeyId"):
        obstore.get(s3_store(s3, access_key_id="nobody"), path)  # HEAD errors have no body
    with pytest.raises(FileNotFoundError):
        obstore.head(store, key("intruder.txt"))


def test_presigned_get_url(store: S3Store, key: Callable[[str], str]) -> None:
    """obstore.sign makes a GET URL that httpx fetches without credentials; a tampered one fails."""
    path = key("shared.png")
    obstore.put(store, path, b"\x89PNG-bytes", attributes={"Content-Type": "image/png"})
    url = obstore.sign(store, "GET", path, dt.timedelta(minutes=5))
    assert "X-Amz-Signature=" in url
    with httpx.Client(trust_env=False) as client:
        fetched = client.get(url)
        assert fetched.status_code == 200
        assert fetched.content == b"\x89PNG-bytes"
        assert fetched.headers["content-type"] == "image/png"
        tampered = re.sub(r"X-Amz-Signature=\w+", "X-Amz-Signature=" + "0" * 64, url)
        assert client.get(tampered).status_code == 403


def test_attributes_round_trip(s3: SeaweedS3, store: S3Store, key: Callable[[str], str]) -> None:
    """Content-Type, Cache-Control and user metadata (sha256) set on put come back from get."""
    path = key("image.png")
    body = b"not really a png"
    sha = hashlib.sha256(body).hexdigest()
    attributes = {
        "Content-Type": "image/png",
        "Cache-Control": "max-age=31536000, immutable",
        "Content-Disposition": 'attachment; filename="image.png"',
        "sha256": sha,
        "Kling-Task": "867283741759111202",
    }
    obstore.put(store, path, body, attributes=attributes)
    got = obstore.get(store, path).attributes
    # User metadata names come back lower-cased (S3 semantics); standard attributes as set.
    expected = {name: value for name, value in attributes.items() if name != "Kling-Task"}
    assert got == {**expected, "kling-task": "867283741759111202"}
    raw = s3.request("HEAD", f"{s3.bucket}/{path}")
    assert raw.headers["x-amz-meta-sha256"] == sha


async def async_chunks(
    count: int,
    size: int,
    *,
    fail_at: int | None = None,
    before_fail: Callable[[], None] | None = None,
) -> AsyncIterator[bytes]:
    """`chunks` as an async iterator, the shape a streamed download has."""
    for chunk in chunks(count, size, fail_at=fail_at, before_fail=before_fail):
        yield chunk


@pytest.mark.anyio
async def test_put_async_from_async_iterator(store: S3Store, key: Callable[[str], str]) -> None:
    """put_async streams an async iterator as a multipart upload that reads back intact."""
    path = key("async.bin")
    result = await obstore.put_async(store, path, async_chunks(3, PART), chunk_size=PART)
    assert result["e_tag"] is not None and result["e_tag"].endswith('-3"')
    got = await obstore.get_async(store, path)
    digest = hashlib.sha256()
    async for block in got.stream():
        digest.update(block)
    assert digest.hexdigest() == expected_sha256(3, PART)


@pytest.mark.anyio
async def test_put_async_aborts_when_async_iterator_raises(
    s3: SeaweedS3, store: S3Store, key: Callable[[str], str]
) -> None:
    """A failing async source propagates out of put_async and leaves no object or open upload."""
    path = key("async-broken.bin")
    source = async_chunks(5, PART, fail_at=3, before_fail=wait_for_open_upload(s3, path))
    with pytest.raises(RuntimeError, match="source failed midway"):
        await obstore.put_async(store, path, source, chunk_size=PART)
    assert s3.list_multipart_uploads(prefix=path) == []
    with pytest.raises(FileNotFoundError):
        await obstore.head_async(store, path)
