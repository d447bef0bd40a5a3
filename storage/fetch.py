"""Bytes from a URL: a streaming GET that checks, hashes and hands each chunk to a writer.

The bulk path uses the standard library's `http.client` in a worker thread
rather than httpx: it reads straight into 1 MiB buffers the writer lends, and
hashing, socket reads and file writes all release the GIL, so a download runs
at disk speed with flat memory (see BENCHMARKS.md). It never reads proxy
variables, follows at most `max_redirects` redirects itself, checks every hop
with the `UrlPolicy` and connects to the address that was checked.

Every socket read is metered, so an attempt that trickles (below
`Limits.min_rate` over a window, or past the deadline its size allows) ends
even though no single read times out.
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
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote, urljoin, urlsplit

from storage._errors import FetchError, TooLarge
from storage.guard import Target, UrlPolicy

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["MAX_RETRY_AFTER", "READ_SIZE", "Fetched", "Limits", "Writer", "fetch"]

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
) -> Fetched:
    """Stream `url` into `writer`, resuming after its held bytes where the server allows it.

    Raises `RefusedURL` for a URL (or redirect) the policy refuses, `TooLarge`
    past `limits.max_bytes`, and `FetchError` (with `retry`, `status` and
    `retry_after`) for everything else that stops the download.
    """
    meter = _Meter(url, limits, cancel)
    current = url
    for _ in range(limits.max_redirects + 1):
        target = policy.resolve(current)
        connection = _connect(target, limits, meter)
        try:
            resume_from = writer.offset if writer.offset and writer.validator else 0
            response = _request(connection, target, writer, resume_from)
            try:
                if response.status in _REDIRECTS:
                    location = response.getheader("location")
                    if not location:
                        raise FetchError(url, f"HTTP {response.status} without a Location header")
                    current = urljoin(current, location)
                    continue
                return _receive(url, current, response, writer, resume_from, limits, meter)
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
) -> Fetched:
    status = response.status
    validator = _validator(response)
    resumed = False
    if status == 206 and resume_from:
        start = _range_start(response)
        if start != resume_from:
            writer.restart(None)
            raise FetchError(
                url, f"the server resumed at byte {start}, not {resume_from}", retry=True
            )
        resumed = True
    elif status == 200:
        if writer.offset or writer.validator != validator:
            writer.restart(validator)
    elif status == 416 and resume_from:
        # Held bytes that reach the end (a crash before commit) cannot be resumed: start over.
        writer.restart(None)
        raise FetchError(
            url, f"the server cannot resume at byte {resume_from}", retry=True, status=status
        )
    else:
        raise _status_error(url, response)

    length = response.getheader("content-length") or ""
    remaining = int(length) if _DIGITS.fullmatch(length) else None
    expected = None if remaining is None else writer.offset + remaining
    if expected is not None and expected > limits.max_bytes:
        raise TooLarge(url, f"the file is {expected} bytes, over the {limits.max_bytes} allowed")
    if remaining is not None:
        meter.allow(remaining)

    content_type = response.getheader("content-type")
    writer.begin(content_type, final_url, expected)
    digest = writer.hasher()
    size = writer.offset
    while True:
        buffer = writer.buffer()
        count = response.readinto(buffer)
        if not count:
            break
        size += count
        if size > limits.max_bytes:
            raise TooLarge(url, f"the file is over the {limits.max_bytes} bytes allowed")
        chunk = buffer[:count]
        digest.update(chunk)
        writer.write(chunk)
    if expected is not None and size != expected:
        raise FetchError(url, f"the body ended after {size} of {expected} bytes", retry=True)
    return Fetched(url, final_url, size, digest.hexdigest(), content_type, resumed)


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
    retry_after = _retry_after(response.getheader("retry-after"))
    reason = f"HTTP {status} {response.reason}".strip()
    if status in _TRANSIENT or status >= 500:
        return FetchError(url, reason, retry=True, status=status, retry_after=retry_after)
    if status in _NOT_YET:
        return FetchError(url, reason, retry=True, status=status, retry_after=retry_after)
    return FetchError(url, reason, retry=False, status=status)


def _retry_after(value: str | None) -> float | None:
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

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        count = super().recv_into(buffer, nbytes, flags)
        self.meter.count(count)
        return count


class _MeteredSSLSocket(ssl.SSLSocket):
    """A TLS socket that reports each read of plain bytes to its attempt's meter."""

    meter: _Meter

    def recv_into(self, buffer: WriteableBuffer, nbytes: int | None = None, flags: int = 0) -> int:
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
