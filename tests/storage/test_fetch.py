"""fetch() against a real misbehaving media server on loopback: resume, errors, limits, hops."""

from __future__ import annotations

import gzip
import hashlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import (
    MAX_RETRY_AFTER,
    FetchError,
    Limits,
    LocalSink,
    LocalWriter,
    NotMedia,
    RefusedURL,
    TooLarge,
    UrlPolicy,
    fetch,
)
from storage.fetch import retry_after_seconds
from tests.media_server import (
    Cut,
    MediaServer,
    Redirect,
    Serve,
    Short,
    Status,
    Trickle,
    Unsized,
    WrongRange,
    media_bytes,
)

LOOPBACK = UrlPolicy(allow_private=True)
BODY = random.Random(7).randbytes(64 * 1024)
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def sink(tmp_path: Path) -> LocalSink:
    """A local sink in a fresh directory."""
    return LocalSink(tmp_path / "assets")


@pytest.fixture
def writer(sink: LocalSink) -> Iterator[LocalWriter]:
    """A writer for one asset, closed at the end of the test."""
    opened = sink.open("videos/t/0")
    yield opened
    opened.close()


def stored(writer: LocalWriter) -> bytes:
    """The bytes the writer holds, committed and read back."""
    return Path(writer.commit("videos/t/0.mp4", {})).read_bytes()


def failure(url: str, writer: LocalWriter, **kwargs: Any) -> FetchError:
    """The FetchError that fetching `url` raises."""
    with pytest.raises(FetchError) as caught:
        fetch(url, writer, policy=LOOPBACK, **kwargs)
    return caught.value


def test_a_plain_download_is_hashed_and_described(media: MediaServer, writer: LocalWriter) -> None:
    """A well-behaved server's file arrives whole, with its sha256, size and type."""
    url = media.add("/v.mp4", BODY)
    fetched = fetch(url, writer, policy=LOOPBACK)
    assert (fetched.url, fetched.final_url, fetched.size) == (url, url, len(BODY))
    assert (fetched.sha256, fetched.content_type, fetched.resumed) == (SHA, "video/mp4", False)
    assert stored(writer) == BODY
    [hit] = media.hits("/v.mp4")
    assert hit.headers["Accept-Encoding"] == "identity"
    assert "Range" not in hit.headers


def test_cut_connections_resume_with_range_and_if_range(
    media: MediaServer, writer: LocalWriter
) -> None:
    """Cut mid-body twice, retrying with the same writer resumes each time and stores the file."""
    url = media.add("/v.mp4", BODY, [Cut(1000), Cut(5000), Serve()])
    for held in (1000, 6000):
        error = failure(url, writer)
        assert error.retry is True
        assert f"after {held} of" in error.reason
        assert writer.offset == held
    fetched = fetch(url, writer, policy=LOOPBACK)
    assert (fetched.sha256, fetched.size, fetched.resumed) == (SHA, len(BODY), True)
    assert stored(writer) == BODY
    etag = media.routes["/v.mp4"].etag
    first, second, third = media.hits("/v.mp4")
    assert "Range" not in first.headers
    assert (second.headers["Range"], second.headers["If-Range"]) == ("bytes=1000-", etag)
    assert (third.headers["Range"], third.headers["If-Range"]) == ("bytes=6000-", etag)


def test_a_new_writer_resumes_where_a_closed_one_stopped(
    media: MediaServer, sink: LocalSink
) -> None:
    """After a restart, a writer opened on the same key resumes from the bytes on disk."""
    url = media.add("/v.mp4", BODY, [Cut(3000), Serve()])
    first = sink.open("videos/t/0")
    failure(url, first)
    first.close()
    second = sink.open("videos/t/0")
    try:
        fetched = fetch(url, second, policy=LOOPBACK)
        assert (fetched.sha256, fetched.resumed) == (SHA, True)
        assert stored(second) == BODY
    finally:
        second.close()
    assert media.hits("/v.mp4")[1].headers["Range"] == "bytes=3000-"


def test_a_server_ignoring_range_starts_over(media: MediaServer, writer: LocalWriter) -> None:
    """A 200 answer to a Range request replaces the held bytes instead of appending to them."""
    url = media.add("/v.mp4", BODY, [Cut(1000), Serve(ranges=False)])
    failure(url, writer)
    fetched = fetch(url, writer, policy=LOOPBACK)
    assert (fetched.sha256, fetched.size, fetched.resumed) == (SHA, len(BODY), False)
    assert stored(writer) == BODY
    assert media.hits("/v.mp4")[1].headers["Range"] == "bytes=1000-"


def test_a_file_changed_between_attempts_is_not_spliced(
    media: MediaServer, writer: LocalWriter
) -> None:
    """When If-Range no longer matches, the new file is downloaded from its first byte."""
    url = media.add("/v.mp4", BODY, [Cut(1000)])
    failure(url, writer)
    changed = bytes(reversed(BODY))
    media.add("/v.mp4", changed)
    fetched = fetch(url, writer, policy=LOOPBACK)
    assert (fetched.sha256, fetched.resumed) == (hashlib.sha256(changed).hexdigest(), False)
    assert stored(writer) == changed


def test_a_range_answer_from_the_wrong_byte_drops_the_held_bytes(
    media: MediaServer, writer: LocalWriter, sink: LocalSink
) -> None:
    """A 206 whose Content-Range does not start at the held size is refused and restarts cleanly."""
    url = media.add("/v.mp4", BODY, [Cut(1000), WrongRange(500), Serve()])
    failure(url, writer)
    error = failure(url, writer)
    assert error.retry is True
    assert "resumed at byte 500, not 1000" in error.reason
    assert (writer.offset, writer.validator) == (0, None)
    assert not (sink.root / "videos/t/.0.part.json").exists()
    fetched = fetch(url, writer, policy=LOOPBACK)
    assert (fetched.sha256, fetched.resumed) == (SHA, False)
    assert stored(writer) == BODY
    assert "Range" not in media.hits("/v.mp4")[2].headers


def test_an_unsatisfiable_resume_starts_over(media: MediaServer, writer: LocalWriter) -> None:
    """A 416 to a Range request drops the held bytes, so the next attempt downloads afresh."""
    unsatisfiable = Status(416, {"Content-Range": f"bytes */{len(BODY)}"})
    url = media.add("/v.mp4", BODY, [unsatisfiable, Serve()])
    writer.restart(media.routes["/v.mp4"].etag)
    writer.write(memoryview(BODY))  # all of it, held by an attempt that died before commit
    error = failure(url, writer)
    assert (error.retry, error.status) == (True, 416)
    assert (writer.offset, writer.validator) == (0, None)
    fetched = fetch(url, writer, policy=LOOPBACK)
    assert (fetched.sha256, fetched.resumed) == (SHA, False)
    assert stored(writer) == BODY
    assert media.hits("/v.mp4")[0].headers["Range"] == f"bytes={len(BODY)}-"
    assert "Range" not in media.hits("/v.mp4")[1].headers


@pytest.mark.parametrize("code", [500, 502, 503, 504, 408, 429])
def test_transient_statuses_are_retried(media: MediaServer, writer: LocalWriter, code: int) -> None:
    """Server errors, timeouts and rate limits are worth another try."""
    error = failure(media.add("/v.mp4", BODY, [Status(code)]), writer)
    assert (type(error), error.retry, error.status, error.retry_after) == (
        FetchError,
        True,
        code,
        None,
    )
    assert str(code) in error.reason


@pytest.mark.parametrize("code", [403, 404, 410])
def test_not_yet_there_statuses_are_retried_with_their_status(
    media: MediaServer, writer: LocalWriter, code: int
) -> None:
    """403/404/410 may be a CDN lagging behind: retried, status kept for the worker to cap."""
    error = failure(media.add("/v.mp4", BODY, [Status(code)]), writer)
    assert (error.retry, error.status) == (True, code)


@pytest.mark.parametrize("code", [400, 401, 416])
def test_client_errors_are_final(media: MediaServer, writer: LocalWriter, code: int) -> None:
    """A request the server will never accept is not retried."""
    error = failure(media.add("/v.mp4", BODY, [Status(code, {"Retry-After": "5"})]), writer)
    assert (error.retry, error.status, error.retry_after) == (False, code, None)


def test_retry_after_seconds(media: MediaServer, writer: LocalWriter) -> None:
    """A 429 with Retry-After: 2 tells the worker to wait two seconds."""
    error = failure(media.add("/v.mp4", BODY, [Status(429, {"Retry-After": "2"})]), writer)
    assert (error.retry, error.status, error.retry_after) == (True, 429, 2.0)


def test_retry_after_http_date(media: MediaServer, writer: LocalWriter) -> None:
    """A Retry-After given as an HTTP date becomes the seconds until then."""
    later = formatdate(time.time() + 120, usegmt=True)
    error = failure(media.add("/v.mp4", BODY, [Status(503, {"Retry-After": later})]), writer)
    assert error.retry_after is not None
    assert 115 <= error.retry_after <= 121


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Mon, 01 Jan 2001 00:00:00 GMT", 0.0),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("\u00b2", None),  # a digit to str.isdigit(), not to int()
        ("Mon, 99 Foo 2024 25:61:00 GMT", None),
    ],
)
def test_retry_after_past_or_garbled(
    media: MediaServer, writer: LocalWriter, value: str, expected: float | None
) -> None:
    """A Retry-After date in the past means now; one that cannot be read is ignored."""
    error = failure(media.add("/v.mp4", BODY, [Status(429, {"Retry-After": value})]), writer)
    assert (error.retry, error.retry_after) == (True, expected)


@pytest.mark.parametrize(
    "value",
    ["99999999999999999999", "9" * 5000, "999999", "3601", "Fri, 31 Dec 9999 23:59:59 GMT"],
)
def test_retry_after_is_capped_at_an_hour(
    media: MediaServer, writer: LocalWriter, value: str
) -> None:
    """A huge number, a far-off date or days of seconds all mean an hour, never an overflow."""
    error = failure(media.add("/v.mp4", BODY, [Status(503, {"Retry-After": value})]), writer)
    assert (error.retry, error.retry_after) == (True, MAX_RETRY_AFTER)
    assert MAX_RETRY_AFTER == 3600.0


@given(st.text(max_size=60))
def test_retry_after_never_raises(value: str) -> None:
    """Whatever a Retry-After holds, it reads as None or 0 to an hour of seconds."""
    seconds = retry_after_seconds(value)
    assert seconds is None or 0.0 <= seconds <= MAX_RETRY_AFTER


def test_a_short_body_is_never_complete(media: MediaServer, writer: LocalWriter) -> None:
    """A body that ends before its Content-Length is a retryable FetchError, not a download."""
    error = failure(media.add("/v.mp4", BODY, [Short(100)]), writer)
    assert (type(error), error.retry) == (FetchError, True)
    assert f"ended after 100 of {len(BODY)} bytes" in error.reason


def test_a_body_of_exactly_the_limit_is_accepted(media: MediaServer, writer: LocalWriter) -> None:
    """max_bytes is inclusive."""
    url = media.add("/v.mp4", BODY)
    fetched = fetch(url, writer, policy=LOOPBACK, limits=Limits(max_bytes=len(BODY)))
    assert fetched.size == len(BODY)


def test_a_content_length_over_the_limit_is_refused_up_front(
    media: MediaServer, writer: LocalWriter
) -> None:
    """A Content-Length over max_bytes raises TooLarge before a byte is kept."""
    url = media.add("/v.mp4", BODY)
    with pytest.raises(TooLarge) as caught:
        fetch(url, writer, policy=LOOPBACK, limits=Limits(max_bytes=len(BODY) - 1))
    assert caught.value.retry is False
    assert str(len(BODY)) in caught.value.reason
    assert writer.offset == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["close-delimited", "chunked"])
def test_a_body_without_length_over_the_limit_is_cut_off(
    media: MediaServer, writer: LocalWriter, chunked: bool
) -> None:
    """With no Content-Length, TooLarge is raised once the bytes read pass max_bytes."""
    url = media.add("/v.mp4", BODY, [Unsized(chunked=chunked)])
    with pytest.raises(TooLarge):
        fetch(url, writer, policy=LOOPBACK, limits=Limits(max_bytes=10_000))
    assert writer.offset <= 10_000


@pytest.mark.parametrize("chunked", [False, True], ids=["close-delimited", "chunked"])
def test_a_body_without_length_is_downloaded(
    media: MediaServer, writer: LocalWriter, chunked: bool
) -> None:
    """A chunked or close-delimited body within the limit arrives whole."""
    url = media.add("/v.mp4", BODY, [Unsized(chunked=chunked)])
    assert fetch(url, writer, policy=LOOPBACK).sha256 == SHA
    assert stored(writer) == BODY


def test_five_redirects_are_followed(media: MediaServer, writer: LocalWriter) -> None:
    """A chain of five redirects, relative and absolute, ends at the file."""
    final = media.add("/v.mp4", BODY)
    media.add("/r5", b"", [Redirect(final, 301)])
    for n in range(1, 5):
        media.add(f"/r{n}", b"", [Redirect(f"/r{n + 1}", 307)])
    fetched = fetch(media.url("/r1"), writer, policy=LOOPBACK)
    assert (fetched.url, fetched.final_url, fetched.sha256) == (media.url("/r1"), final, SHA)


def test_more_than_five_redirects_are_refused(media: MediaServer, writer: LocalWriter) -> None:
    """A redirect loop stops after five redirects, without retrying."""
    url = media.add("/loop", b"", [Redirect("/loop")])
    error = failure(url, writer)
    assert error.retry is False
    assert "more than 5 redirects" in error.reason
    assert len(media.hits("/loop")) == 6


def test_a_redirect_without_location_is_an_error(media: MediaServer, writer: LocalWriter) -> None:
    """A 302 with nowhere to go fails the download."""
    error = failure(media.add("/v.mp4", BODY, [Status(302)]), writer)
    assert "without a Location" in error.reason


def test_a_redirect_to_cloud_metadata_is_refused_at_the_hop(
    media: MediaServer, writer: LocalWriter
) -> None:
    """Even with private downloads allowed, a redirect to 169.254.169.254 is never followed."""
    metadata = "http://169.254.169.254/latest/meta-data/"
    url = media.add("/v.mp4", BODY, [Redirect(metadata)])
    with pytest.raises(RefusedURL) as caught:
        fetch(url, writer, policy=LOOPBACK)
    assert (caught.value.url, caught.value.retry) == (metadata, False)
    assert "link-local or cloud metadata" in caught.value.reason
    assert writer.offset == 0


def test_a_redirect_outside_the_allowed_hosts_is_refused(
    media: MediaServer, writer: LocalWriter
) -> None:
    """Every hop is checked against DOWNLOAD_ALLOWED_HOSTS, not only the first URL."""
    port = media.base_url.rsplit(":", 1)[1]
    elsewhere = f"http://localhost:{port}/v.mp4"
    media.add("/v.mp4", BODY)
    url = media.add("/r", b"", [Redirect(elsewhere)])
    policy = UrlPolicy(allow_private=True, allowed_hosts=("127.0.0.1",))
    with pytest.raises(RefusedURL, match="not in DOWNLOAD_ALLOWED_HOSTS"):
        fetch(url, writer, policy=policy)
    assert media.hits("/v.mp4") == []


def test_a_redirect_to_another_scheme_is_refused(media: MediaServer, writer: LocalWriter) -> None:
    """A redirect to file:// is refused like any non-http URL."""
    url = media.add("/r", b"", [Redirect("file:///etc/passwd")])
    with pytest.raises(RefusedURL, match="only http and https"):
        fetch(url, writer, policy=LOOPBACK)


def test_loopback_is_refused_without_a_request(media: MediaServer, writer: LocalWriter) -> None:
    """Under the default policy a URL to 127.0.0.1 is refused before any connection."""
    url = media.add("/v.mp4", BODY)
    with pytest.raises(RefusedURL) as caught:
        fetch(url, writer, policy=UrlPolicy())
    assert caught.value.retry is False
    assert media.requests == []


def test_request_paths_are_percent_encoded(media: MediaServer, writer: LocalWriter) -> None:
    """Spaces and non-ASCII characters in a URL's path are sent percent-encoded, as browsers do."""
    media.add("/a%20b.mp4", BODY)
    media.add("/%E8%A7%86%E9%A2%91.mp4", BODY)
    assert fetch(media.url("/a b.mp4"), writer, policy=LOOPBACK).sha256 == SHA
    assert fetch(media.url("/视频.mp4?x=1%2F"), writer, policy=LOOPBACK).sha256 == SHA
    assert [hit.path for hit in media.requests] == ["/a%20b.mp4", "/%E8%A7%86%E9%A2%91.mp4"]


def test_a_refused_connection_is_retryable(writer: LocalWriter) -> None:
    """Nobody listening on the port is a retryable FetchError."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = failure(f"http://127.0.0.1:{port}/v.mp4", writer)
    assert error.retry is True
    assert "connection failed" in error.reason


def test_a_silent_server_times_out(writer: LocalWriter) -> None:
    """A server that accepts but never answers fails after read_timeout, retryably."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        error = failure(f"http://127.0.0.1:{port}/v.mp4", writer, limits=Limits(read_timeout=0.2))
    assert error.retry is True
    assert time.monotonic() - started < 5


def test_a_cancelled_download_stops(media: MediaServer, writer: LocalWriter) -> None:
    """A set cancel event stops the download with a retryable error before any byte is kept."""
    url = media.add("/v.mp4", BODY)
    cancel = threading.Event()
    cancel.set()
    error = failure(url, writer, cancel=cancel)
    assert error.retry is True
    assert "stopped" in error.reason
    assert writer.offset == 0


VIDEO = media_bytes(64 * 1024, 7)
VIDEO_SHA = hashlib.sha256(VIDEO).hexdigest()
PAGE = b"<html><body><h1>403 Forbidden</h1></body></html>\n" * 20


def refused(url: str, writer: LocalWriter, expect: str = "video", **kwargs: Any) -> NotMedia:
    """The NotMedia that fetching `url` as `expect` raises."""
    with pytest.raises(NotMedia) as caught:
        fetch(url, writer, policy=LOOPBACK, expect=expect, **kwargs)
    return caught.value


@pytest.mark.parametrize("content_type", ["text/html", "application/json", "text/plain"])
def test_a_document_is_not_taken_for_a_video(
    media: MediaServer, writer: LocalWriter, content_type: str
) -> None:
    """A 200 whose Content-Type is a document is refused before a byte is kept, retryably."""
    error = refused(media.add("/v.mp4", PAGE, [Serve(content_type=content_type)]), writer)
    assert (error.retry, error.status) == (True, 200)
    assert error.reason == f"the server sent {content_type}, not a video"
    assert writer.offset == 0


@pytest.mark.parametrize("content_type", ["application/octet-stream", "video/mp4"])
def test_bytes_unlike_the_kind_are_refused_whatever_the_type(
    media: MediaServer, writer: LocalWriter, content_type: str
) -> None:
    """A page sent as octet-stream (or even as video/mp4) is told by its first bytes."""
    error = refused(media.add("/v.mp4", PAGE, [Serve(content_type=content_type)]), writer)
    assert error.retry is True
    assert error.reason == "the body is not a video: it starts like HTML"
    assert writer.offset == 0


def test_an_image_of_the_wrong_kind_is_refused(media: MediaServer, writer: LocalWriter) -> None:
    """An MP3 where an image should be is refused, naming what it looks like."""
    url = media.add("/i.png", media_bytes(2000, like="mp3"), [Serve(content_type="image/png")])
    assert "it starts like an MP3 file" in refused(url, writer, "image").reason


def test_an_empty_body_is_no_video(media: MediaServer, writer: LocalWriter) -> None:
    """A 200 with nothing in it is not a video file."""
    assert refused(media.add("/v.mp4", b""), writer).reason.endswith("it is empty")


@pytest.mark.parametrize(("like", "kind"), [("mp4", "video"), ("png", "image"), ("wav", "audio")])
def test_media_of_the_kind_is_stored_as_it_came(
    media: MediaServer, writer: LocalWriter, like: str, kind: str
) -> None:
    """The check passes real media untouched: same bytes, same sha256."""
    body = media_bytes(50_000, like, like)
    url = media.add("/m", body, [Serve(content_type="application/octet-stream")])
    fetched = fetch(url, writer, policy=LOOPBACK, expect=kind)
    assert fetched.sha256 == hashlib.sha256(body).hexdigest()
    assert stored(writer) == body


def test_a_start_that_arrives_byte_by_byte_is_judged_whole(
    media: MediaServer, writer: LocalWriter, sink: LocalSink
) -> None:
    """When the first reads bring a byte each, the check waits for enough of them."""
    body = media_bytes(40, like="wav")
    url = media.add("/a.wav", body, [Trickle(every=0.01, sized=True)])
    assert (
        fetch(url, writer, policy=LOOPBACK, expect="audio").sha256
        == hashlib.sha256(body).hexdigest()
    )
    page = media.add("/p.wav", PAGE[:40], [Trickle(every=0.01, sized=True)])
    other = sink.open("videos/t/1")
    try:
        assert "HTML" in refused(page, other, "audio").reason
        assert other.offset == 0
    finally:
        other.close()


def test_held_bytes_that_are_no_video_are_dropped_not_resumed(
    media: MediaServer, writer: LocalWriter
) -> None:
    """A resume checks the start of the held bytes; a page held from before is dropped."""
    url = media.add("/v.mp4", VIDEO)
    writer.restart(media.routes["/v.mp4"].etag)
    writer.write(memoryview(PAGE))  # held by an older attempt that checked nothing
    error = refused(url, writer)
    assert "held from an earlier attempt" in error.reason and "HTML" in error.reason
    assert (writer.offset, writer.validator) == (0, None)
    assert media.hits("/v.mp4")[0].headers["Range"] == f"bytes={len(PAGE)}-"
    fetched = fetch(url, writer, policy=LOOPBACK, expect="video")
    assert (fetched.sha256, fetched.resumed) == (VIDEO_SHA, False)
    assert stored(writer) == VIDEO


def test_a_checked_download_resumes_after_a_cut(media: MediaServer, writer: LocalWriter) -> None:
    """A cut download's held start passes the check, and the rest comes by Range."""
    url = media.add("/v.mp4", VIDEO, [Cut(3000), Serve()])
    failure(url, writer, expect="video")
    fetched = fetch(url, writer, policy=LOOPBACK, expect="video")
    assert (fetched.sha256, fetched.resumed) == (VIDEO_SHA, True)
    assert stored(writer) == VIDEO


def test_a_few_held_bytes_are_not_resumed(media: MediaServer, writer: LocalWriter) -> None:
    """Fewer held bytes than the start check needs: the file is fetched whole instead."""
    url = media.add("/v.mp4", VIDEO, [Cut(5), Serve()])
    failure(url, writer)
    assert writer.offset == 5
    assert fetch(url, writer, policy=LOOPBACK, expect="video").resumed is False
    assert "Range" not in media.hits("/v.mp4")[1].headers
    assert stored(writer) == VIDEO


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_forced_encoding_is_decoded(
    media: MediaServer, writer: LocalWriter, encoding: str
) -> None:
    """A body compressed against the request is stored decoded, with the media's sha256 and size."""
    body = media_bytes(200_000, 3) + bytes(300_000)  # compressible, over one read
    url = media.add("/v.mp4", body, [Serve(encoding=encoding)])
    fetched = fetch(url, writer, policy=LOOPBACK, expect="video")
    assert (fetched.size, fetched.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert fetched.content_type == "video/mp4"
    assert stored(writer) == body


def test_several_gzip_members_are_one_body(media: MediaServer, writer: LocalWriter) -> None:
    """gzip allows members one after another: they decode to one file."""
    halves = VIDEO[:30_000], VIDEO[30_000:]
    joined = gzip.compress(halves[0]) + gzip.compress(halves[1])
    headers = {"Content-Encoding": "gzip", "Content-Type": "video/mp4"}
    url = media.add("/v.mp4", joined, [Status(200, headers, body=joined)])
    assert fetch(url, writer, policy=LOOPBACK, expect="video").sha256 == VIDEO_SHA


def test_a_gzip_bomb_stops_at_the_limit(media: MediaServer, writer: LocalWriter) -> None:
    """max_bytes bounds the decoded bytes, not the few compressed ones."""
    url = media.add("/v.mp4", media_bytes(16) + bytes(20 << 20), [Serve(encoding="gzip")])
    with pytest.raises(TooLarge):
        fetch(url, writer, policy=LOOPBACK, limits=Limits(max_bytes=1 << 20), expect="video")
    assert writer.offset <= 1 << 20


def test_an_encoded_download_is_never_resumed(media: MediaServer, writer: LocalWriter) -> None:
    """Decoded bytes are held without a validator (a Range counts encoded bytes): never resumed."""
    url = media.add("/v.mp4", VIDEO, [Serve(encoding="gzip")])
    fetch(url, writer, policy=LOOPBACK)
    assert writer.validator is None
    writer.restart(media.routes["/v.mp4"].etag)  # identity bytes held from an earlier answer
    writer.write(memoryview(VIDEO[:5000]))
    error = failure(url, writer)
    assert (error.retry, error.reason) == (
        True,
        "the server resumed in an encoding it did not use before",
    )
    assert (writer.offset, writer.validator) == (0, None)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Content-Encoding": "br"}, "the body is br-encoded, which is not decoded"),
        ({"Content-Encoding": "gzip, gzip"}, "the body is gzip, gzip-encoded"),
        ({"Content-Encoding": "gzip"}, "the gzip body cannot be decoded"),
    ],
)
def test_an_encoding_that_cannot_be_undone_is_refused(
    media: MediaServer, writer: LocalWriter, headers: dict[str, str], reason: str
) -> None:
    """Unknown or stacked encodings, and corrupt gzip, are retryable errors, nothing kept."""
    error = failure(media.add("/v.mp4", VIDEO, [Status(200, headers, body=VIDEO)]), writer)
    assert error.retry is True
    assert error.reason.startswith(reason)
    assert writer.offset == 0


def test_a_gzip_body_cut_short_is_not_complete(media: MediaServer, writer: LocalWriter) -> None:
    """A gzip stream that ends before its end is retried, not stored."""
    cut = gzip.compress(VIDEO)[:-100]
    headers = {"Content-Encoding": "gzip"}
    error = failure(media.add("/v.mp4", VIDEO, [Status(200, headers, body=cut)]), writer)
    assert (error.retry, error.reason) == (True, "the gzip body ended midway")


SLOW = Limits(min_rate=1000, rate_window=0.5)


@pytest.mark.parametrize("sized", [False, True], ids=["unsized", "sized"])
def test_a_trickle_is_cut_after_a_window(
    media: MediaServer, writer: LocalWriter, sized: bool
) -> None:
    """20 bytes/s against 1000 required: cut after the first half-second window, retryably,
    although no single read waits long enough to time out."""
    url = media.add("/v.mp4", VIDEO[:200], [Trickle(every=0.05, sized=sized)])
    started = time.monotonic()
    error = failure(url, writer, limits=SLOW)
    assert time.monotonic() - started < 2
    assert error.retry is True
    assert (
        error.reason.startswith("too slow: ") and "under the 1000 bytes/s allowed" in error.reason
    )
    wait_for_end(media, "/v.mp4")


def test_a_sized_download_ends_by_its_deadline(media: MediaServer, writer: LocalWriter) -> None:
    """With the size known, the attempt has the floor plus the size at min_rate, however long
    the rate window."""
    limits = Limits(min_rate=1000, rate_window=60, deadline_floor=0.3)
    url = media.add("/v.mp4", VIDEO[:200], [Trickle(every=0.05, sized=True)])
    started = time.monotonic()
    error = failure(url, writer, limits=limits)
    assert 0.5 <= time.monotonic() - started < 2
    assert (error.retry, error.reason) == (True, "too slow: not done in the 0.5 s its size allows")
    wait_for_end(media, "/v.mp4")


def test_a_steady_download_is_not_cut(media: MediaServer, writer: LocalWriter) -> None:
    """A download at twice the minimum rate, over several windows, completes."""
    body = media_bytes(6000, 5)
    url = media.add("/v.mp4", body, [Serve(rate=4000)])
    limits = Limits(min_rate=2000, rate_window=0.3, deadline_floor=0.5)
    assert (
        fetch(url, writer, policy=LOOPBACK, limits=limits).sha256
        == hashlib.sha256(body).hexdigest()
    )


def test_a_cancel_stops_a_slow_read_at_once(media: MediaServer, writer: LocalWriter) -> None:
    """Cancelling mid-trickle stops within a read, not when a 1 MiB buffer is full."""
    url = media.add("/v.mp4", VIDEO[:400], [Trickle(every=0.05)])
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    error = failure(url, writer, cancel=cancel)
    assert time.monotonic() - started < 1
    assert "stopped" in error.reason


def wait_for_end(media: MediaServer, path: str) -> None:
    """Wait until the server sees the client hang up on its (only) request to `path`."""
    deadline = time.monotonic() + 5
    while media.hits(path)[0].ended is None:
        assert time.monotonic() < deadline, "the client never hung up"
        time.sleep(0.02)
