"""A real HTTP media server on loopback that misbehaves on purpose, as CDNs sometimes do.

Each path gets a script: a list of behaviours (Serve, Cut, Status, Short,
Redirect, WrongRange, Unsized, Trickle), one consumed per request (the last one
repeats). Every request is logged with its headers, its answer's status, first
byte and body bytes sent, and when the answer ended, so tests can count fetches
(`Request.reached_end`: which of them delivered a whole file), see `Range`
requests and time a slow answer.

    server.add("/v.mp4", media_bytes(64_000), [Cut(1000), Cut(5000), Serve()])

The service checks that a body starts like the media it should be: `media_bytes`
makes bodies that do (an MP4, a PNG, an MP3…), followed by random bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The first bytes of each format, enough for the service's check of a file's start.
STARTS = {
    "mp4": b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom",
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    "mp3": b"ID3\x04\x00\x00\x00\x00\x00\x00",
    "wav": b"RIFF\x24\x00\x00\x00WAVEfmt ",
}


def media_bytes(size: int, seed: int | str | bytes = 0, like: str = "mp4") -> bytes:
    """`size` bytes that start like a file of the format `like` (a key of STARTS) and go on
    as random bytes; the same seed gives the same bytes."""
    start = STARTS[like]
    return (start + random.Random(seed).randbytes(max(0, size - len(start))))[:size]


@dataclass(frozen=True)
class Serve:
    """Serve the file properly: ETag, Range with If-Range, and `rate` bytes/s if set.

    With `encoding` ("gzip" or "deflate") the body is compressed and sent with that
    Content-Encoding, although the client asked for identity (Range counts its bytes).
    """

    ranges: bool = True
    rate: int | None = None
    content_type: str = "video/mp4"
    encoding: str | None = None


@dataclass(frozen=True)
class Cut:
    """Promise the whole file (or the asked range), send `after` bytes, then drop the connection."""

    after: int
    ranges: bool = True


@dataclass(frozen=True)
class Status:
    """Answer with this status and headers, and `body` (else a short line naming the status)."""

    code: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


@dataclass(frozen=True)
class Short:
    """Claim the full Content-Length but send only `send` bytes and close."""

    send: int


@dataclass(frozen=True)
class Redirect:
    location: str
    code: int = 302


@dataclass(frozen=True)
class WrongRange:
    """Answer any request with 206 and the bytes from `start`, whatever range was asked."""

    start: int


@dataclass(frozen=True)
class Unsized:
    """Serve the whole file without Content-Length: chunked, or ended by closing the connection."""

    chunked: bool = False


@dataclass(frozen=True)
class Trickle:
    """Send the file `step` bytes every `every` seconds, until it ends or the client hangs up.

    Without `sized` there is no Content-Length (the body ends when the connection closes).
    """

    every: float = 1.0
    step: int = 1
    sized: bool = False


Behaviour = Serve | Cut | Status | Short | Redirect | WrongRange | Unsized | Trickle


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    at: float
    ended: float | None = None  # when the answer was sent, or the client hung up
    status: int | None = None
    first_byte: int = 0  # where in the file the body starts: a 206's range start
    sent: int = 0  # body bytes the client's socket took (after the headers), so far

    def reached_end(self, size: int) -> bool:
        """The answer's body ran to the file's last byte: `size` is the body's full length
        (the encoded one, for a compressed answer).

        `sent` counts what the client's socket took, not what the client read: a client
        killed with bytes unread in its socket is not told apart from one that read them.
        """
        return self.status in (200, 206) and self.first_byte + self.sent >= size


@dataclass
class _Route:
    body: bytes
    script: list[Behaviour]
    served: int = 0

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'

    def next(self) -> Behaviour:
        behaviour = self.script[min(self.served, len(self.script) - 1)]
        self.served += 1
        return behaviour


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (a killed service) is no error of the server's."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class MediaServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 with scripted misbehaviour."""

    def __init__(self) -> None:
        self.routes: dict[str, _Route] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # A short poll keeps stop() (and so each test's teardown) from waiting half a second.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add(self, path: str, body: bytes, script: Sequence[Behaviour] = (Serve(),)) -> str:
        """Serve `body` at `path` following `script`; returns the full URL."""
        with self._lock:
            self.routes[path] = _Route(body, list(script))
        return self.url(path)

    def hits(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            _request: Request | None = None  # the request being answered, to note its answer
            _in_body = False

            def setup(self) -> None:
                super().setup()
                self.wfile = _Counted(self.wfile, self)

            def log_message(self, format: str, *args: object) -> None:
                pass

            def send_response(self, code: int, message: str | None = None) -> None:
                if self._request is not None:
                    self._request.status = code
                super().send_response(code, message)

            def end_headers(self) -> None:
                super().end_headers()
                self._in_body = True

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                request = Request(path, dict(self.headers), time.monotonic())
                self._request, self._in_body = request, False
                with server._lock:
                    server.requests.append(request)
                    route = server.routes.get(path)
                    behaviour = route.next() if route else Status(404)
                try:
                    self._answer(route, behaviour)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                finally:
                    request.ended = time.monotonic()
                    self._request = None

            def _answer(self, route: _Route | None, behaviour: Behaviour) -> None:
                if isinstance(behaviour, Status) or route is None:
                    assert isinstance(behaviour, Status)
                    body = behaviour.body
                    if body is None:
                        body = f"status {behaviour.code}\n".encode()
                    self.send_response(behaviour.code)
                    for name, value in behaviour.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if isinstance(behaviour, Redirect):
                    self.send_response(behaviour.code)
                    self.send_header("Location", behaviour.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if isinstance(behaviour, Short):
                    self.send_response(200)
                    self.send_header("Content-Type", "video/mp4")
                    self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    self.wfile.write(route.body[: behaviour.send])
                    self.close_connection = True
                    return
                if isinstance(behaviour, WrongRange | Unsized):
                    self._answer_oddly(route, behaviour)
                    return
                if isinstance(behaviour, Trickle):
                    self._trickle(route, behaviour)
                    return
                encoding = behaviour.encoding if isinstance(behaviour, Serve) else None
                body = _encode(route.body, encoding)
                ranges = behaviour.ranges
                start = self._range_start(route, len(body)) if ranges else 0
                part = body[start:]
                if self._request is not None:
                    self._request.first_byte = start
                self.send_response(206 if start else 200)
                content_type = (
                    behaviour.content_type if isinstance(behaviour, Serve) else "video/mp4"
                )
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(part)))
                self.send_header("ETag", route.etag)
                if encoding:
                    self.send_header("Content-Encoding", encoding)
                if ranges:
                    self.send_header("Accept-Ranges", "bytes")
                if start:
                    total = len(body)
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                self.end_headers()
                if isinstance(behaviour, Cut):
                    self.wfile.write(part[: behaviour.after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._send(part, behaviour.rate)

            def _answer_oddly(self, route: _Route, behaviour: WrongRange | Unsized) -> None:
                total = len(route.body)
                if isinstance(behaviour, WrongRange):
                    part = route.body[behaviour.start :]
                    if self._request is not None:
                        self._request.first_byte = behaviour.start
                    self.send_response(206)
                    self.send_header(
                        "Content-Range", f"bytes {behaviour.start}-{total - 1}/{total}"
                    )
                    self.send_header("Content-Length", str(len(part)))
                else:
                    part = route.body
                    self.send_response(200)
                    if behaviour.chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                    else:
                        self.send_header("Connection", "close")
                self.send_header("Content-Type", "video/mp4")
                self.send_header("ETag", route.etag)
                self.end_headers()
                if isinstance(behaviour, Unsized) and behaviour.chunked:
                    for offset in range(0, total, 4096):
                        chunk = part[offset : offset + 4096]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                self.wfile.write(part)
                if isinstance(behaviour, Unsized):
                    self.close_connection = True

            def _trickle(self, route: _Route, behaviour: Trickle) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                if behaviour.sized:
                    self.send_header("Content-Length", str(len(route.body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                for offset in range(0, len(route.body), behaviour.step):
                    self.wfile.write(route.body[offset : offset + behaviour.step])
                    self.wfile.flush()
                    time.sleep(behaviour.every)

            def _range_start(self, route: _Route, size: int) -> int:
                asked = self.headers.get("Range", "")
                if not asked.startswith("bytes=") or not asked.endswith("-"):
                    return 0
                if_range = self.headers.get("If-Range")
                if if_range is not None and if_range != route.etag:
                    return 0
                start = int(asked[len("bytes=") : -1])
                return start if 0 < start < size else 0

            def _send(self, data: bytes, rate: int | None) -> None:
                if rate is None:
                    self.wfile.write(data)
                    return
                step = max(1, rate // 20)
                for offset in range(0, len(data), step):
                    self.wfile.write(data[offset : offset + step])
                    self.wfile.flush()
                    time.sleep(0.05)

        return Handler


class _Counted:
    """A handler's socket writer that adds each body write to its request's `sent`."""

    def __init__(self, raw: Any, handler: Any) -> None:
        self._raw = raw
        self._handler = handler

    def write(self, data: bytes) -> int:
        written: int = self._raw.write(data)  # all of it, or it raised
        request = self._handler._request
        if request is not None and self._handler._in_body:
            request.sent += written
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _encode(body: bytes, encoding: str | None) -> bytes:
    """The body as a server that compresses it sends it."""
    if encoding == "gzip":
        return gzip.compress(body, mtime=0)
    if encoding == "deflate":
        return zlib.compress(body)
    assert encoding is None, encoding
    return body


@contextmanager
def media_server() -> Iterator[MediaServer]:
    server = MediaServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
