"""A real endpoint for outbound events on loopback, that checks every signature.

    with event_receiver(EVENT_WEBHOOK_SECRET, up=False) as receiver:
        env = {"EVENT_WEBHOOK_URLS": receiver.url, "ALLOW_PRIVATE_EVENT_URLS": "true"}
        ...                         # connections are refused: nothing listens on the port
        receiver.answer(500)        # listening, every request answered 500
        receiver.answer(200)        # listening, every request delivered
        receiver.down()             # refused again, on the same port

Every request is verified with `standardwebhooks` (the reference library, not the
service's own code) under the secret, and recorded in arrival order with its
`webhook-id`, the event's type, its task and its data, and the status it was answered.
A request whose signature does not verify is answered 401 and kept in `rejected`.

While it is down the port stays bound to a socket that does not listen, so nobody
else takes it (the service's own outgoing connections included) and a connection is
refused at once. Each answer closes its connection (HTTP/1.0), so no kept-alive
connection outlives a switch of mode.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["EventReceiver", "Received", "event_receiver"]


@dataclass(frozen=True)
class Received:
    """One verified request: the event it carried and how it was answered."""

    msg_id: str  # webhook-id
    type: str
    task_id: str
    data: dict[str, Any]
    body: bytes
    headers: dict[str, str]
    status: int  # what the receiver answered
    at: float  # time.monotonic() on arrival

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A sender that hangs up (a killed service) is no error of the receiver's."""
        pass


class EventReceiver:
    """Receives the service's events on 127.0.0.1:`port`; see the module docstring."""

    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)
        self.received: list[Received] = []
        self.rejected: list[tuple[dict[str, str], bytes, str]] = []
        self._status = 200
        self._headers: dict[str, str] = {}
        self._changed = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._parked: socket.socket | None = self._bound(0)
        self.port: int = self._parked.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    @property
    def listening(self) -> bool:
        return self._server is not None

    def answer(self, status: int, headers: dict[str, str] | None = None) -> None:
        """Listen (if down), and answer every request from now on with `status` and `headers`."""
        with self._changed:
            self._status, self._headers = status, dict(headers or {})
        if self._server is None:
            assert self._parked is not None
            server = _Server(("127.0.0.1", self.port), self._handler(), bind_and_activate=False)
            server.socket.close()
            server.socket, self._parked = self._parked, None
            server.server_address = server.socket.getsockname()
            server.server_activate()  # listen(): from here connections are accepted
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
            )
            self._thread.start()

    def down(self) -> None:
        """Stop listening: from now on connections to the port are refused."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        assert self._thread is not None
        self._thread.join(5)
        self._parked = self._bound(self.port)

    def close(self) -> None:
        self.down()
        if self._parked is not None:
            self._parked.close()
            self._parked = None

    @staticmethod
    def _bound(port: int) -> socket.socket:
        """A socket bound to the port that does not listen: connections to it are refused."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return sock

    def delivered(self) -> list[Received]:
        """The requests answered 2xx, in arrival order."""
        with self._changed:
            return [r for r in self.received if r.delivered]

    def failed(self) -> list[Received]:
        """The requests answered with something else, in arrival order."""
        with self._changed:
            return [r for r in self.received if not r.delivered]

    def wait_until(self, check: Callable[[EventReceiver], bool], what: str, timeout: float) -> None:
        """Wait (bounded) until `check(self)` holds, looking again at every arrival."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not check(self):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}; received {self.summary()}"
                self._changed.wait(min(left, 0.2))

    def summary(self) -> list[tuple[str, str, str, int]]:
        """What arrived, shortly: (task_id, type, webhook-id, status) in arrival order."""
        return [(r.task_id, r.type, r.msg_id, r.status) for r in list(self.received)]

    def _record(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        """Verify and keep a request; the status and headers to answer it with."""
        try:
            payload = self.webhook.verify(body, headers)
        except (WebhookVerificationError, ValueError) as exc:
            with self._changed:
                self.rejected.append((headers, body, str(exc)))
                self._changed.notify_all()
            return 401, {}
        data = payload["data"]
        with self._changed:
            status, extra = self._status, dict(self._headers)
            self.received.append(
                Received(
                    msg_id=headers["webhook-id"],
                    type=payload["type"],
                    task_id=data["task_id"],
                    data=data,
                    body=body,
                    headers=headers,
                    status=status,
                    at=time.monotonic(),
                )
            )
            self._changed.notify_all()
        return status, extra

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request a connection

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {key.lower(): value for key, value in self.headers.items()}
                status, extra = receiver._record(headers, body)
                answer = json.dumps({"status": status}).encode()
                self.send_response(status)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        return Handler


@contextmanager
def event_receiver(secret: str, *, up: bool = True) -> Iterator[EventReceiver]:
    """An `EventReceiver`, answering 200 if `up`, else refusing connections; closed at the end."""
    receiver = EventReceiver(secret)
    if up:
        receiver.answer(200)
    try:
        yield receiver
    finally:
        receiver.close()
