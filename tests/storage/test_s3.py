"""The S3 sink against a real S3 server (SeaweedFS): multipart and single PUTs, aborts, sidecars,
idempotent re-stores, credential and reachability errors, presigned links and refused keys.

Downloads come from the misbehaving media server through `fetch`, the way the download
workers drive a writer: `open(stem)`, `fetch`, then `commit(stem + extension, sidecar)`, or
`close()` / `discard()` when something failed. Every test works under a prefix of its own in
the session's bucket, and checks the bucket with its own obstore store, not the sink's.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import obstore
import pytest
from obstore.store import S3Store

from storage import (
    FetchError,
    Limits,
    S3Options,
    S3Sink,
    SinkError,
    TooLarge,
    UrlPolicy,
    extension,
    fetch,
    open_sink,
)
from storage.fetch import READ_SIZE
from storage.s3 import PROBE_KEY, S3Writer, _Upload
from tests.media_server import Cut, MediaServer, Serve, Unsized
from tests.s3_server import SeaweedS3

MiB = 1024 * 1024
PART = 5 * MiB  # the smallest part S3 accepts
BIG = 40 * MiB  # eight parts
POLICY = UrlPolicy(allow_private=True)
MULTIPART_ETAG = re.compile(r'"[0-9a-f]{32}-(\d+)"')
SINGLE_ETAG = re.compile(r'"[0-9a-f]{32}"')


def s3_options(s3: SeaweedS3, **overrides: Any) -> S3Options:
    """Options for the session's server: path-style over plain http, 5 MiB parts."""
    values: dict[str, Any] = {
        "access_key_id": s3.access_key,
        "secret_access_key": s3.secret_key,
        "region": s3.region,
        "endpoint_url": s3.endpoint_url,
        "path_style": True,
        "allow_http": True,
        "part_size": PART,
        "upload_concurrency": 2,
    }
    return S3Options(**{**values, **overrides})


@pytest.fixture
def sink(s3: SeaweedS3) -> S3Sink:
    """A sink on the session's bucket, under a prefix unique to this test (via open_sink)."""
    made = open_sink(f"s3://{s3.bucket}/tests/{uuid.uuid4().hex}", s3_options(s3))
    assert isinstance(made, S3Sink)
    return made


@pytest.fixture
def store(s3: SeaweedS3) -> S3Store:
    """The test's own view of the bucket, independent of the sink."""
    return S3Store(s3.bucket, **s3.obstore_config(), client_options={"allow_http": True})


def payload(size: int) -> bytes:
    """`size` random bytes (so no two tests, or attempts, share a body by accident)."""
    return os.urandom(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(
    sink: S3Sink,
    url: str,
    stem: str,
    *,
    limits: Limits | None = None,
    **extra: object,
) -> str:
    """One worker-style attempt: fetch into a writer and commit it; the location it returns.

    On failure the writer is closed (or discarded when the body is too large), as the
    download workers do, and the error propagates.
    """
    writer = sink.open(stem)
    try:
        fetched = fetch(url, writer, policy=POLICY, limits=limits or Limits())
        key = stem + extension(fetched.content_type, fetched.final_url)
        sidecar = {"sha256": fetched.sha256, "size": fetched.size, **extra}
        return writer.commit(key, sidecar)
    except TooLarge:
        writer.discard()
        raise
    except BaseException:
        writer.close()
        raise


def sidecar_of(store: S3Store, key: str) -> dict[str, Any]:
    note: dict[str, Any] = json.loads(bytes(obstore.get(store, key + ".json").bytes()))
    return note


def assert_absent(store: S3Store, key: str) -> None:
    """Neither the object nor its sidecar is at `key`."""
    for path in (key, key + ".json"):
        with pytest.raises(FileNotFoundError):
            obstore.head(store, path)


def wait_for_open_upload(s3: SeaweedS3, prefix: str, seconds: float = 5.0) -> list[str]:
    """The multipart uploads open under `prefix`, waiting (a little) for one to show up."""
    deadline = time.monotonic() + seconds
    while not (open_uploads := s3.list_multipart_uploads(prefix=prefix)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return open_uploads


# -- complete uploads --------------------------------------------------------------------


def test_large_download_lands_as_a_multipart_object_with_sha256_and_sidecar(
    s3: SeaweedS3, sink: S3Sink, store: S3Store, media: MediaServer
) -> None:
    """A 40 MiB download becomes an 8-part object, intact, with its type, sha256 and sidecar."""
    body = payload(BIG)
    url = media.add("/big.mp4", body)
    location = download(sink, url, "videos/t1/0", task_id="t1")
    key = f"{sink.prefix}videos/t1/0.mp4"
    assert sink.prefix.startswith("tests/") and sink.prefix.endswith("/")
    assert location == f"s3://{s3.bucket}/{key}"
    got = obstore.get(store, key)
    match = MULTIPART_ETAG.fullmatch(got.meta["e_tag"] or "")
    assert match is not None and int(match.group(1)) == BIG // PART, got.meta["e_tag"]
    assert got.meta["size"] == BIG
    assert got.attributes == {"Content-Type": "video/mp4", "sha256": sha256(body)}
    assert sha256(bytes(got.bytes())) == sha256(body)
    raw = s3.request("HEAD", f"{s3.bucket}/{key}")
    assert raw.headers["x-amz-meta-sha256"] == sha256(body)
    assert sidecar_of(store, key) == {"sha256": sha256(body), "size": BIG, "task_id": "t1"}
    assert obstore.get(store, key + ".json").attributes["Content-Type"] == "application/json"
    assert s3.list_multipart_uploads(prefix=sink.prefix) == []
    assert len(media.hits("/big.mp4")) == 1


def test_a_long_download_reuses_the_buffers_obstore_has_sent(
    s3: SeaweedS3, sink: S3Sink, store: S3Store, media: MediaServer
) -> None:
    """Full reads go to obstore without a copy, and their buffers are lent again once their
    part is sent: far fewer buffers than reads, and the object's bytes are intact."""
    body = payload(BIG)
    url = media.add("/reused.mp4", body)
    writer = sink.open("videos/t1b/0")
    lent: list[object] = []  # every buffer lent, kept alive so that identities stay distinct
    lend = writer.buffer

    def spy() -> memoryview:
        view = lend()
        lent.append(view.obj)
        return view

    writer.buffer = spy  # type: ignore[method-assign]
    fetched = fetch(url, writer, policy=POLICY)
    writer.commit("videos/t1b/0.mp4", {"sha256": fetched.sha256, "size": fetched.size})
    streamed = [buffer for buffer in lent if buffer is not writer._scratch.obj]
    distinct = len({id(buffer) for buffer in streamed})
    # At most what obstore may hold (parts in flight, the part it fills, a part of slack,
    # each touching one read more than it spans), the queue, and the read in progress.
    most = (sink.options.upload_concurrency + 2) * (PART // READ_SIZE + 1) + 4 + 1
    assert len(streamed) > 30 and 1 < distinct <= most, (len(streamed), distinct)
    assert sha256(bytes(obstore.get(store, f"{sink.prefix}videos/t1b/0.mp4").bytes())) == sha256(
        body
    )


class _HoldingSink:
    """Stands in for `S3Sink.upload`: takes every chunk through the buffer protocol, as obstore
    does, and holds it until the test lets go of it."""

    # obstore may hold (1 + 2) parts of (5 + 1) reads: 18 lent buffers
    options = S3Options("key", "secret", part_size=5 * MiB, upload_concurrency=1)

    def __init__(self) -> None:
        self.held: list[pickle.PickleBuffer] = []  # each holds a buffer export, as obstore does
        self.pulled = threading.Semaphore(0)

    def upload(self, key: str, chunks: Iterator[Any], content_type: str) -> str:
        for chunk in chunks:
            if isinstance(chunk, memoryview):
                self.held.append(pickle.PickleBuffer(chunk))
            self.pulled.release()
        return '"etag"'

    def error(self, problem: object, doing: str, key: str | None = None) -> SinkError:
        return SinkError(str(key), f"{doing}: {problem}")


def test_a_buffer_is_lent_again_only_once_the_upload_lets_go_of_it() -> None:
    """While the upload holds a full chunk, its buffer is not lent for another read; once the
    upload lets go of it, the next read goes into it. Short reads are copied."""
    holder = _HoldingSink()
    upload = _Upload(holder, "k", "video/mp4", bytearray(b"first part"))  # type: ignore[arg-type]
    assert holder.pulled.acquire(timeout=5)

    def send_full(fill: bytes) -> bytearray:
        view = upload.lend()
        assert view is not None
        base = view.obj
        assert isinstance(base, bytearray)
        view[:] = fill * READ_SIZE
        upload.send(view[:READ_SIZE])
        assert holder.pulled.acquire(timeout=5)
        return base

    a = send_full(b"a")
    b = send_full(b"b")  # obstore took `a` before asking for `b`, and holds both
    c = send_full(b"c")
    assert len({id(a), id(b), id(c)}) == 3
    holder.held.pop(0).release()  # the upload lets go of `a`
    d = send_full(b"d")
    assert d is a
    assert [bytes(held.raw()[:2]) for held in holder.held] == [b"bb", b"cc", b"dd"]

    short = upload.lend()
    assert short is not None
    short[:3] = b"end"
    upload.send(short[:3])  # a short read is copied: its buffer is lent again at once
    assert holder.pulled.acquire(timeout=5)
    again = upload.lend()
    assert again is not None and again.obj is short.obj
    assert upload.finish() == '"etag"'


def test_reads_are_copied_while_the_upload_holds_all_it_may() -> None:
    """Once obstore holds as many chunks as its parts in flight explain, no new buffer is
    lent (reads go elsewhere and are copied) until it lets go of one."""
    holder = _HoldingSink()
    upload = _Upload(holder, "k", "video/mp4", bytearray(b"first part"))  # type: ignore[arg-type]
    assert holder.pulled.acquire(timeout=5)
    lent = []
    for _ in range(18):
        view = upload.lend()
        assert view is not None
        lent.append(view.obj)
        upload.send(view[:READ_SIZE])
        assert holder.pulled.acquire(timeout=5)
    assert len({id(base) for base in lent}) == 18
    deadline = time.monotonic() + 5
    while len(upload._taken) < 18 and time.monotonic() < deadline:
        time.sleep(0.01)  # the last chunk counts as taken once the next one is asked for

    assert upload.lend() is None
    upload.send(memoryview(bytearray(b"x" * READ_SIZE)))  # read elsewhere: copied
    assert holder.pulled.acquire(timeout=5)
    assert len(holder.held) == 18
    assert upload.lend() is None

    holder.held.pop(0).release()
    view = upload.lend()
    assert view is not None and view.obj is lent[0]
    upload.send(view[:READ_SIZE])
    assert holder.pulled.acquire(timeout=5)
    assert upload.finish() == '"etag"'


def test_small_download_is_one_put_with_sha256_and_sidecar(
    s3: SeaweedS3, sink: S3Sink, store: S3Store, media: MediaServer
) -> None:
    """A body no larger than one part is a single PUT (plain ETag) with type, sha256, sidecar."""
    body = payload(PART)  # exactly one part: still one PUT
    url = media.add("/small.png", body, [Serve(content_type="image/png")])
    location = download(sink, url, "images/t2/0")
    key = f"{sink.prefix}images/t2/0.png"
    assert location == f"s3://{s3.bucket}/{key}"
    got = obstore.get(store, key)
    assert SINGLE_ETAG.fullmatch(got.meta["e_tag"] or ""), got.meta["e_tag"]
    assert got.attributes == {"Content-Type": "image/png", "sha256": sha256(body)}
    assert bytes(got.bytes()) == body
    assert sidecar_of(store, key) == {"sha256": sha256(body), "size": PART}
    assert s3.list_multipart_uploads(prefix=sink.prefix) == []


def test_one_byte_over_a_part_is_multipart_and_special_key_characters_survive(
    s3: SeaweedS3, sink: S3Sink, store: S3Store, media: MediaServer
) -> None:
    """PART + 1 bytes go up in 2 parts; '+' and '=' in the key survive the copy and presign."""
    body = payload(PART + 1)
    url = media.add("/edge.mp4", body)
    location = download(sink, url, "videos/a+b=c/0")
    key = f"{sink.prefix}videos/a+b=c/0.mp4"
    assert location == f"s3://{s3.bucket}/{key}"
    got = obstore.get(store, key)
    match = MULTIPART_ETAG.fullmatch(got.meta["e_tag"] or "")
    assert match is not None and match.group(1) == "2", got.meta["e_tag"]
    assert got.attributes == {"Content-Type": "video/mp4", "sha256": sha256(body)}
    assert bytes(got.bytes()) == body
    link = sink.presign(location, 60)
    assert link is not None
    with httpx.Client(trust_env=False) as client:
        shared = client.get(link)
    assert shared.status_code == 200 and shared.content == body


def test_unsized_download_streams_into_the_bucket(
    s3: SeaweedS3, sink: S3Sink, store: S3Store, media: MediaServer
) -> None:
    """A chunked body without Content-Length (size unknown at begin) is stored whole too."""
    body = payload(12 * MiB)
    url = media.add("/chunked.mp4", body, [Unsized(chunked=True)])
    download(sink, url, "videos/t3/0")
    key = f"{sink.prefix}videos/t3/0.mp4"
    got = obstore.get(store, key)
    assert got.attributes["sha256"] == sha256(body)
    assert bytes(got.bytes()) == body
    assert sidecar_of(store, key)["size"] == len(body)


# -- failures leave nothing behind -------------------------------------------------------


def test_source_cut_mid_stream_leaves_no_object_and_no_open_upload(
    s3: SeaweedS3, sink: S3Sink, store: S3Store, media: MediaServer
) -> None:
    """A body cut at 20 of 40 MiB: FetchError, and close() aborts the upload already open."""
    body = payload(BIG)
    url = media.add("/cut.mp4", body, [Cut(20 * MiB)])
    writer = sink.open("videos/t4/0")
    with pytest.raises(FetchError) as caught:
        fetch(url, writer, policy=POLICY)
    assert caught.value.retry
    key = f"{sink.prefix}videos/t4/0.mp4"
    assert wait_for_open_upload(s3, sink.prefix) == [key]  # the upload was under way
    writer.close()
    assert s3.list_multipart_uploads(prefix=sink.prefix) == []
    assert_absent(store, key)


def test_too_large_mid_stream_is_discarded_without_trace(
    s3: SeaweedS3, sink: S3Sink, store: S3Store, media: MediaServer
) -> None:
    """A chunked body that passes MAX_ASSET_BYTES midway: TooLarge, discard(), nothing left."""
    url = media.add("/huge.mp4", payload(24 * MiB), [Unsized(chunked=True)])
    with pytest.raises(TooLarge):
        download(sink, url, "videos/t5/0", limits=Limits(max_bytes=16 * MiB))
    assert s3.list_multipart_uploads(prefix=sink.prefix) == []
    assert_absent(store, f"{sink.prefix}videos/t5/0.mp4")


@pytest.mark.parametrize("size", [MiB, 12 * MiB], ids=["one-put", "multipart"])
@pytest.mark.parametrize("wrong", ["size", "key"])
def test_a_commit_that_does_not_match_the_download_stores_nothing(
    s3: SeaweedS3, sink: S3Sink, store: S3Store, media: MediaServer, size: int, wrong: str
) -> None:
    """A sidecar size or key other than what was downloaded: SinkError, no object, no upload."""
    body = payload(size)
    url = media.add("/mismatch.mp4", body)
    writer = sink.open("videos/t6/0")
    fetched = fetch(url, writer, policy=POLICY)
    if size > PART:
        assert wait_for_open_upload(s3, sink.prefix) != []
    if wrong == "size":
        sidecar = {"sha256": fetched.sha256, "size": fetched.size + 1}
        with pytest.raises(SinkError, match=f"{size} bytes were written, not {size + 1}") as caught:
            writer.commit("videos/t6/0.mp4", sidecar)
        assert caught.value.retry
    else:
        sidecar = {"sha256": fetched.sha256, "size": fetched.size}
        with pytest.raises(SinkError, match="the download began as") as caught:
            writer.commit("videos/t6/0.png", sidecar)
        assert not caught.value.retry
    assert not caught.value.unavailable
    writer.close()
    assert s3.list_multipart_uploads(prefix=sink.prefix) == []
    for name in ("videos/t6/0.mp4", "videos/t6/0.png"):
        assert_absent(store, sink.prefix + name)


def test_an_object_changed_before_the_metadata_copy_is_not_claimed(
    s3: SeaweedS3,
    sink: S3Sink,
    store: S3Store,
    media: MediaServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sha256 copy is guarded by the upload's ETag: other bytes put meanwhile are not claimed.

    Someone overwrites the object between the multipart upload and the metadata copy: the
    copy fails (PreconditionFailed), commit raises a retryable SinkError, no sidecar is
    written, and the intruding bytes are not labelled with the download's sha256.
    """
    body = payload(PART + MiB)
    key = f"{sink.prefix}videos/t18/0.mp4"
    set_metadata = sink.set_metadata

    def overwritten_first(*args: Any) -> None:
        obstore.put(store, key, b"intruder", attributes={"Content-Type": "text/plain"})
        set_metadata(*args)

    monkeypatch.setattr(sink, "set_metadata", overwritten_first)
    with pytest.raises(SinkError, match="PreconditionFailed") as caught:
        download(sink, media.add("/raced.mp4", body), "videos/t18/0")
    assert caught.value.retry and not caught.value.unavailable
    got = obstore.get(store, key)
    assert bytes(got.bytes()) == b"intruder"
    assert "sha256" not in got.attributes
    with pytest.raises(FileNotFoundError):
        obstore.head(store, key + ".json")
    assert s3.list_multipart_uploads(prefix=sink.prefix) == []


# -- idempotent re-stores ----------------------------------------------------------------


@pytest.mark.parametrize("size", [MiB, 12 * MiB], ids=["one-put", "multipart"])
def test_same_bytes_again_are_not_uploaded_again(
    s3: SeaweedS3, sink: S3Sink, store: S3Store, media: MediaServer, size: int
) -> None:
    """Storing the same bytes under the same key again only hashes them: object and sidecar stay."""
    body = payload(size)
    url = media.add("/same.mp4", body)
    first = download(sink, url, "videos/t7/0", attempt=1)
    key = f"{sink.prefix}videos/t7/0.mp4"
    before = obstore.head(store, key)
    time.sleep(1.1)  # Last-Modified has one-second resolution: a new upload would show
    second = download(sink, url, "videos/t7/0", attempt=2)
    assert second == first
    assert len(media.hits("/same.mp4")) == 2  # downloaded (to compare), not uploaded
    after = obstore.head(store, key)
    assert (after["e_tag"], after["last_modified"]) == (before["e_tag"], before["last_modified"])
    assert sidecar_of(store, key) == {"sha256": sha256(body), "size": size, "attempt": 1}
    assert s3.list_multipart_uploads(prefix=sink.prefix) == []


@pytest.mark.parametrize("size", [MiB, 12 * MiB], ids=["one-put", "multipart"])
def test_other_bytes_of_the_same_size_replace_the_stored_file_on_the_next_attempt(
    s3: SeaweedS3, sink: S3Sink, store: S3Store, media: MediaServer, size: int
) -> None:
    """Other bytes under a stored key: SinkError naming the stored sha256, then replaced."""
    old, new = payload(size), payload(size)
    download(sink, media.add("/old.mp4", old), "videos/t8/0", attempt=1)
    key = f"{sink.prefix}videos/t8/0.mp4"
    url = media.add("/new.mp4", new)
    with pytest.raises(SinkError) as caught:
        download(sink, url, "videos/t8/0", attempt=2)
    assert caught.value.retry and not caught.value.unavailable
    assert sha256(old) in caught.value.reason
    assert bytes(obstore.get(store, key).bytes()) == old  # untouched until the next attempt
    assert sidecar_of(store, key)["attempt"] == 1

    location = download(sink, url, "videos/t8/0", attempt=3)
    assert location == f"s3://{sink.bucket}/{key}"
    got = obstore.get(store, key)
    assert bytes(got.bytes()) == new
    assert got.attributes["sha256"] == sha256(new)
    assert sidecar_of(store, key) == {"sha256": sha256(new), "size": size, "attempt": 3}

    # The replacement is done: the same new bytes once more are recognised and skipped.
    assert download(sink, url, "videos/t8/0", attempt=4) == location
    assert sidecar_of(store, key)["attempt"] == 3
    assert s3.list_multipart_uploads(prefix=sink.prefix) == []


def test_a_different_size_or_a_missing_sidecar_is_uploaded_at_once(
    sink: S3Sink, store: S3Store, media: MediaServer
) -> None:
    """A stored file of another size, or an object without sidecar, is overwritten directly."""
    key = f"{sink.prefix}videos/t9/0.mp4"
    download(sink, media.add("/a.mp4", payload(1000)), "videos/t9/0")
    longer = payload(2000)
    download(sink, media.add("/b.mp4", longer), "videos/t9/0")
    assert bytes(obstore.get(store, key).bytes()) == longer
    assert sidecar_of(store, key)["size"] == 2000
    obstore.delete(store, key + ".json")  # e.g. a crash between the object and its sidecar
    download(sink, media.add("/b.mp4", longer), "videos/t9/0", again=True)
    assert sidecar_of(store, key) == {"sha256": sha256(longer), "size": 2000, "again": True}


# -- credentials, reachability and classification ----------------------------------------


def test_check_passes_and_leaves_its_probe_under_the_prefix(sink: S3Sink, store: S3Store) -> None:
    """check() is None on a working bucket; its probe file sits under the sink's prefix."""
    assert sink.check() is None
    probe = json.loads(bytes(obstore.get(store, sink.prefix + PROBE_KEY).bytes()))
    assert set(probe) == {"checked_at"}


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"secret_access_key": "not-the-secret"}, "SignatureDoesNotMatch"),
        ({"access_key_id": "nobody"}, "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials_make_the_sink_unavailable(
    s3: SeaweedS3, overrides: dict[str, str], code: str
) -> None:
    """Refused credentials: check() says which variables to fix; begin() raises unavailable."""
    bad = S3Sink(s3.bucket, f"tests/{uuid.uuid4().hex}", s3_options(s3, **overrides))
    reason = bad.check()
    assert reason is not None
    assert f"refused the credentials ({code})" in reason
    assert "AWS_ACCESS_KEY_ID" in reason and "AWS_SECRET_ACCESS_KEY" in reason
    assert s3.secret_key not in reason
    writer = bad.open("videos/t10/0")
    with pytest.raises(SinkError) as caught:
        writer.begin("video/mp4", "http://cdn.example/v.mp4", 1000)
    assert caught.value.unavailable and caught.value.retry
    assert "AWS_ACCESS_KEY_ID" in caught.value.reason
    writer.close()


@pytest.mark.parametrize("size", [MiB, 12 * MiB], ids=["one-put", "multipart"])
def test_a_missing_bucket_is_named_and_not_created(
    s3: SeaweedS3, media: MediaServer, size: int
) -> None:
    """A bucket that does not exist: check() and the download say so, and nothing creates it."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    missing = S3Sink(bucket, "p", s3_options(s3))
    says = f"bucket {bucket} does not exist at {s3.endpoint_url}: create it, or correct STORAGE_URL"
    assert missing.check() == says
    with pytest.raises(SinkError) as caught:
        download(missing, media.add(f"/missing-{size}.mp4", payload(size)), "videos/t18/0")
    assert caught.value.unavailable and caught.value.retry
    assert caught.value.reason == says
    assert s3.request("HEAD", bucket).status_code == 404


@pytest.mark.parametrize("size", [MiB, 12 * MiB], ids=["one-put", "multipart"])
def test_read_only_credentials_are_told_which_permissions_they_lack(
    s3: SeaweedS3, store: S3Store, media: MediaServer, size: int
) -> None:
    """Credentials the server knows but may not write with (AccessDenied): check() and the
    download name the permissions needed; nothing is stored and no upload is left open."""
    prefix = f"tests/{uuid.uuid4().hex}"
    reader = S3Sink(
        s3.bucket,
        prefix,
        s3_options(s3, access_key_id=s3.reader_key, secret_access_key=s3.reader_secret),
    )
    needs = (
        f"(AccessDenied): they need s3:PutObject and s3:GetObject on s3://{s3.bucket}/{prefix}/*"
    )
    reason = reader.check()
    assert reason is not None and reason.endswith(needs), reason
    with pytest.raises(SinkError) as caught:
        download(reader, media.add(f"/denied-{size}.mp4", payload(size)), "videos/t19/0")
    assert caught.value.unavailable and caught.value.retry
    assert caught.value.reason.endswith(needs), caught.value.reason
    assert s3.list_multipart_uploads(prefix=prefix) == []
    assert_absent(store, f"{prefix}/videos/t19/0.mp4")


@pytest.mark.parametrize("size", [MiB, 12 * MiB], ids=["one-put", "multipart"])
def test_credentials_revoked_mid_download_make_the_sink_unavailable(
    s3: SeaweedS3,
    sink: S3Sink,
    store: S3Store,
    media: MediaServer,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
) -> None:
    """Credentials refused after begin(): the upload (write or commit) raises SinkError unavailable.

    The sink's store is swapped for one with a wrong secret once the writer has begun,
    as when keys are rotated while a download runs.
    """
    body = payload(size)
    writer = sink.open("videos/t11/0")
    writer.begin("video/mp4", "http://cdn.example/v.mp4", size)
    bad = S3Sink(s3.bucket, "x", s3_options(s3, secret_access_key="not-the-secret"))
    monkeypatch.setattr(sink, "_store", bad._store)
    with pytest.raises(SinkError) as caught:
        for offset in range(0, size, MiB):
            writer.write(memoryview(body[offset : offset + MiB]))
        writer.commit("videos/t11/0.mp4", {"sha256": sha256(body), "size": size})
    assert caught.value.unavailable
    assert "refused the credentials (SignatureDoesNotMatch)" in caught.value.reason
    writer.close()
    assert s3.list_multipart_uploads(prefix=sink.prefix) == []
    assert_absent(store, f"{sink.prefix}videos/t11/0.mp4")


def test_unreachable_endpoint_is_reported_quickly(s3: SeaweedS3) -> None:
    """Nothing listens at the endpoint: check() and begin() say 'cannot reach' within seconds."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    sink = S3Sink("bucket", "prefix", s3_options(s3, endpoint_url=endpoint))
    started = time.monotonic()
    reason = sink.check()
    assert time.monotonic() - started < 10
    assert reason is not None and reason.startswith(f"cannot reach S3 at {endpoint}: "), reason
    writer = sink.open("videos/t17/0")
    with pytest.raises(SinkError, match=f"^cannot reach S3 at {endpoint}: ") as caught:
        writer.begin("video/mp4", "http://cdn.example/v.mp4", 1000)
    assert caught.value.unavailable
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(
    ("problem", "unavailable", "says"),
    [
        (
            "<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist"
            "</Message></Error>",
            True,
            "bucket kling-test does not exist at",
        ),
        (
            "<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
            True,
            "does not let these credentials store files in s3://kling-test/p/ (AccessDenied)",
        ),
        (
            "<Error><Code>ExpiredToken</Code></Error>",
            True,
            "refused the credentials (ExpiredToken): check AWS_ACCESS_KEY_ID",
        ),
        (
            "<Error><Code>InternalError</Code><Message>We encountered an internal error"
            "</Message></Error>",
            False,
            "S3 could not store files in s3://kling-test/p/: InternalError: We encountered",
        ),
        ("something odd\nsecond line", False, "S3 could not store files in s3://kling-test/p/"),
    ],
    ids=["no-such-bucket", "access-denied", "expired-token", "internal-error", "no-code"],
)
def test_error_classification(s3: SeaweedS3, problem: str, unavailable: bool, says: str) -> None:
    """S3 error codes become SinkErrors saying what to fix; only sink-wide ones are unavailable."""
    sink = S3Sink("kling-test", "p", s3_options(s3))
    error = sink.error(problem, "store files in")
    assert isinstance(error, SinkError)
    assert error.unavailable is unavailable
    assert error.retry
    assert says in error.reason
    assert "second line" not in error.reason


def test_a_403_without_a_code_is_access_denied(s3: SeaweedS3) -> None:
    """An HTTP 403 with no S3 error code (denied=True) still names the permissions needed."""
    sink = S3Sink("kling-test", "p", s3_options(s3))
    error = sink.error("<html>Forbidden</html>", "set the metadata of", denied=True)
    assert error.unavailable
    assert "(HTTP 403): they need s3:PutObject and s3:GetObject" in error.reason


# -- presigned links ---------------------------------------------------------------------


def test_presigned_url_serves_the_file_until_it_expires(sink: S3Sink, media: MediaServer) -> None:
    """presign() gives a URL that GETs the bytes without credentials, refused once expired."""
    body = payload(1000)
    location = download(sink, media.add("/p.png", body, [Serve(content_type="image/png")]), "i/0")
    url = sink.presign(location, 60)
    assert url is not None and "X-Amz-Signature=" in url
    short = sink.presign(location, 1)
    assert short is not None
    with httpx.Client(trust_env=False) as client:
        fetched = client.get(url)
        assert fetched.status_code == 200
        assert fetched.content == body
        assert fetched.headers["content-type"] == "image/png"
        time.sleep(2.1)
        assert client.get(short).status_code == 403
        assert client.get(url).status_code == 200


@pytest.mark.parametrize(
    "location",
    ["s3://other-bucket/x.mp4", "s3://kling-test-other/x.mp4", "/srv/assets/x.mp4", "kling-test"],
)
def test_presign_refuses_locations_outside_the_bucket(sink: S3Sink, location: str) -> None:
    """A location in another bucket, or not in a bucket at all, gets no URL."""
    assert sink.bucket == "kling-test"
    assert sink.presign(location, 60) is None


# -- keys, prefixes and open_sink --------------------------------------------------------


@pytest.mark.parametrize(
    "stem", ["../x", "a//b", "/abs", "a/./b", "a/../b", "a/b/", ".hidden", "sp ace", "a\\b", ""]
)
def test_unsafe_keys_are_refused(sink: S3Sink, stem: str) -> None:
    """Stems that a path or URL could misread are refused (not retried) before any request."""
    with pytest.raises(SinkError, match="unsafe storage key") as caught:
        sink.open(stem)
    assert not caught.value.retry


def test_an_unsafe_commit_key_is_refused(sink: S3Sink) -> None:
    """commit() refuses an unsafe key too, even when the writer began with a safe stem."""
    writer = sink.open("videos/t12/0")
    writer.begin("video/mp4", "http://cdn.example/v.mp4", 3)
    writer.write(memoryview(b"abc"))
    with pytest.raises(SinkError, match="unsafe storage key") as caught:
        writer.commit("videos/../0.mp4", {"sha256": sha256(b"abc"), "size": 3})
    assert not caught.value.retry
    writer.discard()


@pytest.mark.parametrize(
    "storage_url",
    ["s3://kling-test/../x", "s3://kling-test/a//b", "s3://kling-test/a/./b", "s3:///prefix"],
)
def test_unsafe_prefixes_and_missing_buckets_are_refused(s3: SeaweedS3, storage_url: str) -> None:
    """open_sink refuses an s3:// URL with an unsafe prefix or without a bucket."""
    with pytest.raises(SinkError):
        open_sink(storage_url, s3_options(s3))


def test_open_sink_needs_credentials_for_a_bucket() -> None:
    """An s3:// STORAGE_URL without S3Options is a SinkError, not a sink that fails later."""
    with pytest.raises(SinkError, match="needs AWS credentials"):
        open_sink("s3://kling-test/prefix")


def test_prefix_is_normalised_and_may_be_empty(
    s3: SeaweedS3, store: S3Store, media: MediaServer
) -> None:
    """'/a/b/' becomes 'a/b/'; with no prefix at all files go to the top of the bucket."""
    assert S3Sink(s3.bucket, "/a/b/", s3_options(s3)).prefix == "a/b/"
    bucket = s3.create_bucket()
    top = open_sink(f"s3://{bucket}", s3_options(s3))
    assert isinstance(top, S3Sink) and top.prefix == ""
    location = download(top, media.add("/top.mp4", b"top"), "videos/t13/0")
    assert location == f"s3://{bucket}/videos/t13/0.mp4"
    fresh = S3Store(bucket, **s3.obstore_config(), client_options={"allow_http": True})
    assert bytes(obstore.get(fresh, "videos/t13/0.mp4").bytes()) == b"top"
    assert top.check() is None
    assert obstore.head(fresh, PROBE_KEY)["size"] > 0


def test_the_writer_protocol_shape(sink: S3Sink) -> None:
    """An S3 writer never resumes: offset 0, and restart() takes the validator it is given."""
    writer = sink.open("videos/t14/0")
    assert isinstance(writer, S3Writer)
    assert writer.offset == 0 and writer.validator is None
    writer.restart('"etag-1"')
    assert writer.offset == 0 and writer.validator == '"etag-1"'
    assert writer.hasher().hexdigest() == sha256(b"")
    writer.close()


def test_presign_expiry_is_in_the_url(sink: S3Sink) -> None:
    """The URL carries the lifetime asked for (X-Amz-Expires)."""
    url = sink.presign(sink.location("videos/t15/0.mp4"), 3600)
    assert url is not None and "X-Amz-Expires=3600" in url


def test_a_dropped_sink_leaks_no_socket(s3: SeaweedS3, media: MediaServer) -> None:
    """A sink that did a multipart upload and is then dropped leaves no unclosed socket."""
    sink = S3Sink(s3.bucket, f"tests/{uuid.uuid4().hex}", s3_options(s3))
    download(sink, media.add("/leak.mp4", payload(PART + 1)), "videos/t16/0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del sink
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == [], [str(w.message) for w in leaks]
