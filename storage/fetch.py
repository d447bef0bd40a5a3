"""Bytes from a URL: a streaming GET that checks, hashes and hands each chunk to a writer.

The bulk path uses the standard library's `http.client` in a worker thread
rather than httpx: it reads straight into 1 MiB buffers the writer lends, and
hashing, socket reads and file writes all release the GIL, so a download runs
at disk speed with flat memory (see BENCHMARKS.md). It never reads proxy
variables, follows at most `max_redirects` redirects itself, checks every hop
with the `UrlPolicy` and connects to the address that was checked.

Hostile or broken servers are bounded too: every socket read is metered, so an
attempt that trickles (below `Limits.min_rate` over a window, or past the deadline
its size allows) ends even though no single read times out; a forced gzip or
deflate encoding is undone; and with `expect` the body must look like that kind of
media before a byte of it reaches the writer.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import ssl
import string
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import quote, urljoin, urlsplit

from storage._errors import FetchError, NotMedia, TooLarge
from storage.guard import Target, UrlPolicy
from storage.sniff import HEAD_SIZE, KINDS, wrong_start, wrong_type

__all__ = [
    "MAX_RETRY_AFTER",
    "READ_SIZE",
    "Fetched",
    "Limits",
    "Writer",
    "fetch",
    "retry_after_seconds",
]

READ_SIZE = 1 << 20
"""What one read asks of the response: the size of the buffers writers lend."""
MAX_RETRY_AFTER = 3600.0
"""The longest wait a Retry-After is taken at: a server asking for more gets an hour."""
_REDIRECTS = {301, 302, 303, 307, 308}
# Worth trying again: the server or a cache in front of it may answer differently later.
_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}
# The CDN may lag behind the callback: try a few times before giving up.
_NOT_YET = {403, 404, 410}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also takes "²", which int() refuses
# Encodings undone while streaming; others are refused.
_DECODED = {"gzip", "x-gzip", "deflate"}


@dataclass(frozen=True, slots=True)
class Limits:
    """How much and how long a download may take.

    `read_timeout` bounds one silent read. `min_rate` (bytes a second; 0 turns both
    bounds off) bounds a whole attempt: each `rate_window` seconds from the first byte
    must bring at least that rate, and once the size is known the attempt must end
    within `deadline_floor` seconds plus the time the size takes at that rate.
    """

    max_bytes: int = 4 << 30
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    max_redirects: int = 5
    min_rate: float = 16384.0
    rate_window: float = 30.0
    deadline_floor: float = 120.0


@dataclass(frozen=True, slots=True)
class Fetched:
    """A completed download."""

    url: str
    final_url: str
    size: int
    sha256: str
    content_type: str | None
    resumed: bool


class Writer(Protocol):
    """Where the bytes go; it may hold bytes from an earlier attempt to resume after."""

    @property
    def offset(self) -> int:
        """Bytes already held."""
        ...

    @property
    def validator(self) -> str | None:
        """The ETag or Last-Modified the held bytes came with."""
        ...

    def hasher(self) -> hashlib._Hash:
        """A sha256 over the held bytes."""
        ...

    def head(self, size: int) -> bytes:
        """The first `size` held bytes (fewer if fewer are held)."""
        ...

    def restart(self, validator: str | None) -> None:
        """Drop the held bytes; what follows comes with this validator."""
        ...

    def begin(self, content_type: str | None, final_url: str, size: int | None) -> None:
        """The body follows: its Content-Type, the URL it comes from, its full size if known."""
        ...

    def buffer(self) -> memoryview:
        """Where the next read goes: READ_SIZE bytes, asked for before every read.

        `write` may keep the bytes it is given from here instead of copying them, so a
        reader must not touch a buffer again after passing part of it to `write`.
        """
        ...

    def write(self, data: memoryview) -> None:
        """The next bytes of the body: a slice of the last `buffer()`."""
        ...


def fetch(
    url: str,
    writer: Writer,
    *,
    policy: UrlPolicy,
    limits: Limits = Limits(),
    cancel: threading.Event | None = None,
    expect: str | None = None,
) -> Fetched:
    """Stream `url` into `writer`, resuming after its held bytes where the server allows it.

    With `expect` ("video", "image" or "audio") the body must be that kind of media:
    a Content-Type of another kind (text/html, application/json) or first bytes that
    are not such a file raise `NotMedia` before any of it is written.

    Raises `RefusedURL` for a URL (or redirect) the policy refuses, `TooLarge`
    past `limits.max_bytes`, and `FetchError` (with `retry`, `status` and
    `retry_after`) for everything else that stops the download.
    """
    if expect is not None and expect not in KINDS:
        raise ValueError(f"expect must be one of {sorted(KINDS)}, not {expect!r}")
    meter = _Meter(url, limits, cancel)
    current = url
    for _ in range(limits.max_redirects + 1):
        target = policy.resolve(current)
        connection = _connect(target, limits, meter)
        try:
            # Fewer held bytes than the check of a file's start needs are not worth a Range.
            resumable = writer.offset >= HEAD_SIZE and writer.validator
            resume_from = writer.offset if resumable else 0
            response = _request(connection, target, writer, resume_from)
            try:
                if response.status in _REDIRECTS:
                    location = response.getheader("location")
                    if not location:
                        raise FetchError(url, f"HTTP {response.status} without a Location header")
                    current = urljoin(current, location)
                    continue
                return _receive(url, current, response, writer, resume_from, limits, meter, expect)
            finally:
                # A response that owns its connection (Connection: close) keeps the socket open
                # until it is closed itself: hang up now, not when the exception is collected.
                response.close()
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(url, f"connection failed: {_describe(exc)}", retry=True) from exc
        finally:
            connection.close()
    raise FetchError(url, f"more than {limits.max_redirects} redirects")


def _request(
    connection: http.client.HTTPConnection, target: Target, writer: Writer, resume_from: int
) -> http.client.HTTPResponse:
    parts = urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Percent-encode what http.client refuses (spaces, non-ASCII), as browsers do.
    path = quote(path, safe=string.punctuation)
    headers = {"User-Agent": "kling-receiver", "Accept-Encoding": "identity"}
    if resume_from and writer.validator:
        headers["Range"] = f"bytes={resume_from}-"
        headers["If-Range"] = writer.validator
    connection.request("GET", path, headers=headers)
    return connection.getresponse()


def _receive(
    url: str,
    final_url: str,
    response: http.client.HTTPResponse,
    writer: Writer,
    resume_from: int,
    limits: Limits,
    meter: _Meter,
    expect: str | None,
) -> Fetched:
    status = response.status
    if status == 416 and resume_from:
        # Held bytes that reach the end (a crash before commit) cannot be resumed: start over.
        writer.restart(None)
        raise FetchError(
            url, f"the server cannot resume at byte {resume_from}", retry=True, status=status
        )
    if status != 200 and not (status == 206 and resume_from):
        raise _status_error(url, response)
    content_type = response.getheader("content-type")
    refusal = wrong_type(expect, content_type) if expect is not None else None
    if refusal is not None:
        raise NotMedia(url, refusal, status=status)
    decoder = _decoder(url, response.getheader("content-encoding"))
    resumed = status == 206
    if resumed:
        _check_resume(url, response, writer, resume_from, decoder, expect)
    else:
        # Held decoded bytes cannot be resumed: a Range counts the encoded ones. No validator.
        validator = None if decoder else _validator(response)
        if writer.offset or writer.validator != validator:
            writer.restart(validator)

    length = response.getheader("content-length") or ""
    remaining = int(length) if _DIGITS.fullmatch(length) else None
    expected = None if remaining is None else writer.offset + remaining
    if decoder is None and expected is not None and expected > limits.max_bytes:
        raise TooLarge(url, f"the file is {expected} bytes, over the {limits.max_bytes} allowed")
    if remaining is not None:
        meter.allow(remaining)

    writer.begin(content_type, final_url, None if decoder else expected)
    body = _Body(url, writer, limits, None if resumed else expect)
    held = writer.offset
    if decoder is None:
        body.copy(response)
    else:
        body.decode(response, decoder)
    if remaining is not None and body.raw != remaining:
        raise FetchError(
            url, f"the body ended after {held + body.raw} of {expected} bytes", retry=True
        )
    return Fetched(url, final_url, body.size, body.digest.hexdigest(), content_type, resumed)


def _check_resume(
    url: str,
    response: http.client.HTTPResponse,
    writer: Writer,
    resume_from: int,
    decoder: _Decoder | None,
    expect: str | None,
) -> None:
    """Refuse a 206 that cannot continue the held bytes; each refusal drops them."""
    start = _range_start(response)
    if start != resume_from:
        writer.restart(None)
        raise FetchError(url, f"the server resumed at byte {start}, not {resume_from}", retry=True)
    if decoder is not None:
        writer.restart(None)
        raise FetchError(url, "the server resumed in an encoding it did not use before", retry=True)
    refusal = wrong_start(expect, writer.head(HEAD_SIZE)) if expect is not None else None
    if refusal is not None:
        writer.restart(None)
        raise NotMedia(url, f"the bytes held from an earlier attempt: {refusal}")


class _Body:
    """The body on its way into the writer: its start checked, its size bounded, hashed."""

    def __init__(self, url: str, writer: Writer, limits: Limits, expect: str | None) -> None:
        self.url = url
        self.writer = writer
        self.limits = limits
        self.expect = expect  # None once the start is checked (or when nothing is expected)
        self.digest = writer.hasher()
        self.size = writer.offset  # media bytes: what the stored file holds
        self.raw = 0  # bytes of the response body, before any decoding

    def copy(self, response: http.client.HTTPResponse) -> None:
        """Read the body into the writer's buffers as it comes."""
        buffer, filled = self.writer.buffer(), 0
        while True:
            count = response.readinto(buffer[filled:])
            self._received(count)
            filled += count
            if count and self.expect is not None and filled < HEAD_SIZE:
                continue  # a file's start is judged whole: read on into the same buffer
            if filled:
                self._put(buffer[:filled])
                buffer, filled = self.writer.buffer(), 0
            if not count:
                return self._end()

    def decode(self, response: http.client.HTTPResponse, decoder: _Decoder) -> None:
        """Read the body, undo its encoding, and fill the writer's buffers with the result."""
        scratch = memoryview(bytearray(READ_SIZE))
        buffer, filled = self.writer.buffer(), 0
        while True:
            count = response.readinto(scratch)
            self._received(count)
            for piece in decoder.feed(scratch[:count]) if count else decoder.end():
                view = memoryview(piece)
                while view:
                    take = min(len(view), len(buffer) - filled)
                    buffer[filled : filled + take] = view[:take]
                    filled, view = filled + take, view[take:]
                    if filled == len(buffer):
                        self._put(buffer)
                        buffer, filled = self.writer.buffer(), 0
            if count and self.expect is not None and filled < HEAD_SIZE:
                continue
            if filled:
                self._put(buffer[:filled])
                buffer, filled = self.writer.buffer(), 0
            if not count:
                return self._end()

    def _received(self, count: int) -> None:
        self.raw += count
        if self.raw > self.limits.max_bytes:
            raise TooLarge(self.url, f"the file is over the {self.limits.max_bytes} bytes allowed")

    def _put(self, chunk: memoryview) -> None:
        if self.expect is not None:
            self._check_start(bytes(chunk[:HEAD_SIZE]))
        self.size += len(chunk)
        if self.size > self.limits.max_bytes:
            raise TooLarge(self.url, f"the file is over the {self.limits.max_bytes} bytes allowed")
        self.digest.update(chunk)
        self.writer.write(chunk)

    def _end(self) -> None:
        if self.expect is not None:
            self._check_start(b"")  # an empty body is no media file

    def _check_start(self, head: bytes) -> None:
        assert self.expect is not None
        refusal = wrong_start(self.expect, head)
        if refusal is not None:
            raise NotMedia(self.url, refusal)
        self.expect = None


class _Decoder:
    """Undoes a gzip or deflate Content-Encoding, at most READ_SIZE bytes of output at a time.

    A server that compresses although asked for identity still sends the media: decoding
    keeps it, where refusing would fail the asset on every retry. What is stored, hashed,
    sized, checked and held to `max_bytes` is the decoded media.
    """

    def __init__(self, url: str, encoding: str) -> None:
        self.url = url
        self.encoding = encoding
        self._inflate = self._start()

    @staticmethod
    def _start() -> zlib._Decompress:
        # 32 + MAX_WBITS reads a gzip or a zlib header alike: servers mislabel the two.
        return zlib.decompressobj(32 + zlib.MAX_WBITS)

    def feed(self, data: memoryview) -> Iterator[bytes]:
        """The decoded bytes that `data`, the next of the body, gives."""
        pending: bytes | memoryview = data
        try:
            while True:
                if self._inflate.eof and pending:
                    self._inflate = self._start()  # gzip allows several members, one after another
                out = self._inflate.decompress(pending, READ_SIZE)
                if out:
                    yield out
                pending = self._inflate.unused_data if self._inflate.eof else b""
                pending = pending or self._inflate.unconsumed_tail
                if not pending and len(out) < READ_SIZE:
                    return
        except zlib.error as exc:
            raise FetchError(
                self.url, f"the {self.encoding} body cannot be decoded: {exc}", retry=True
            ) from exc

    def end(self) -> Iterator[bytes]:
        """Nothing more: the stream must have reached its end."""
        if not self._inflate.eof:
            raise FetchError(self.url, f"the {self.encoding} body ended midway", retry=True)
        return iter(())


def _decoder(url: str, header: str | None) -> _Decoder | None:
    """What undoes the body's Content-Encoding; None for none. Other encodings are refused."""
    codings = [c.strip().lower() for c in (header or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _DECODED:
        return _Decoder(url, codings[0])
    encoding = ", ".join(codings)
    raise FetchError(url, f"the body is {encoding}-encoded, which is not decoded", retry=True)


def _validator(response: http.client.HTTPResponse) -> str | None:
    """A strong ETag, else Last-Modified: what If-Range may carry."""
    etag = response.getheader("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.getheader("last-modified")


def _range_start(response: http.client.HTTPResponse) -> int | None:
    match = _CONTENT_RANGE.fullmatch((response.getheader("content-range") or "").strip())
    return int(match.group(1)) if match else None


def _status_error(url: str, response: http.client.HTTPResponse) -> FetchError:
    status = response.status
    retry_after = retry_after_seconds(response.getheader("retry-after"))
    reason = f"HTTP {status} {response.reason}".strip()
    if status in _TRANSIENT or status >= 500:
        return FetchError(url, reason, retry=True, status=status, retry_after=retry_after)
    if status in _NOT_YET:
        return FetchError(url, reason, retry=True, status=status, retry_after=retry_after)
    return FetchError(url, reason, retry=False, status=status)


def retry_after_seconds(value: str | None) -> float | None:
    """The seconds a Retry-After asks for, at most MAX_RETRY_AFTER; None if it cannot be read."""
    if value is None:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return min(float(value), MAX_RETRY_AFTER)  # a huge number is inf here, not an error
    try:
        seconds = parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


class _Meter:
    """One attempt's pace: told of every socket read, it stops an attempt that trickles.

    It sits under the response because `readinto` fills its whole buffer before it
    returns: a server sending a byte a second never returns control to a read loop,
    and never trips a read timeout either.
    """

    def __init__(self, url: str, limits: Limits, cancel: threading.Event | None) -> None:
        self.url = url
        self.limits = limits
        self.cancel = cancel
        self.started = time.monotonic()
        self.deadline: float | None = None
        self.window_start: float | None = None  # from a connection's first byte
        self.window_bytes = 0

    def connected(self) -> None:
        """A new connection: its wait for a first byte is bounded by the read timeout."""
        self.window_start, self.window_bytes = None, 0

    def allow(self, size: int) -> None:
        """`size` bytes are to come: the attempt may take the floor plus their time at min_rate."""
        if self.limits.min_rate > 0:
            seconds = self.limits.deadline_floor + size / self.limits.min_rate
            self.deadline = self.started + seconds

    def count(self, received: int) -> None:
        """A read brought `received` bytes: raise if the attempt must stop."""
        if self.cancel is not None and self.cancel.is_set():
            raise FetchError(self.url, "stopped before the download finished", retry=True)
        limits = self.limits
        if limits.min_rate <= 0:
            return
        now = time.monotonic()
        if self.deadline is not None and now > self.deadline:
            allowed = self.deadline - self.started
            raise FetchError(
                self.url, f"too slow: not done in the {allowed:.1f} s its size allows", retry=True
            )
        if self.window_start is None:
            self.window_start = now
        self.window_bytes += received
        elapsed = now - self.window_start
        if elapsed < limits.rate_window:
            return
        if self.window_bytes < limits.min_rate * elapsed:
            raise FetchError(
                self.url,
                f"too slow: {self.window_bytes} bytes in {elapsed:.1f} s, "
                f"under the {limits.min_rate:g} bytes/s allowed",
                retry=True,
            )
        self.window_start, self.window_bytes = now, 0


class _MeteredSocket(socket.socket):
    """A TCP socket that reports each read to its attempt's meter."""

    meter: _Meter

    # `buffer` is any writable buffer (typeshed's WriteableBuffer, a stub-only name).
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        count = super().recv_into(buffer, nbytes, flags)
        self.meter.count(count)
        return count


class _MeteredSSLSocket(ssl.SSLSocket):
    """A TLS socket that reports each read of plain bytes to its attempt's meter."""

    meter: _Meter

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        count = super().recv_into(buffer, nbytes, flags)
        self.meter.count(count)
        return count


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked address, whatever the host name would resolve to now."""

    def __init__(self, target: Target, limits: Limits, meter: _Meter) -> None:
        super().__init__(target.host, target.port, timeout=limits.read_timeout)
        self._target = target
        self._connect_timeout = limits.connect_timeout
        self._meter = meter

    def _open_socket(self) -> socket.socket:
        last: OSError | None = None
        for address in self._target.addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = _MeteredSocket(family, socket.SOCK_STREAM)
            sock.meter = self._meter
            try:
                sock.settimeout(self._connect_timeout)
                sock.connect((address, self._target.port))
            except OSError as exc:
                sock.close()
                last = exc
                continue
            sock.settimeout(self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._meter.connected()
            return sock
        raise last or OSError("no address to connect to")

    def connect(self) -> None:
        self.sock = self._open_socket()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    def __init__(self, target: Target, limits: Limits, meter: _Meter) -> None:
        super().__init__(target, limits, meter)
        self._context = ssl.create_default_context()
        self._context.sslsocket_class = _MeteredSSLSocket

    def connect(self) -> None:
        sock = self._context.wrap_socket(self._open_socket(), server_hostname=self.host)
        assert isinstance(sock, _MeteredSSLSocket)
        sock.meter = self._meter
        self.sock = sock


def _connect(target: Target, limits: Limits, meter: _Meter) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPSConnection(target, limits, meter)
    return _PinnedHTTPConnection(target, limits, meter)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
