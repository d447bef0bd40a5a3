"""Drill: peers that open connections and never finish a request cannot stall the service.

Each test runs the real service and talks raw TCP to it, as a slow or idle
peer on the internet would, while genuine deliveries must still get through.
"""

from __future__ import annotations

import contextlib
import json
import resource
import selectors
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support import Service, json_lines

pytestmark = pytest.mark.e2e

SLOW = 2000
JSON = {"Content-Type": "application/json"}
UNFINISHED = b"POST /callbacks/kling/whatever HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Wait: "


def delivery(service: Service, number: int) -> httpx.Response:
    body = {"task_id": f"genuine-{number}", "task_status": "submitted", "created_at": 1}
    return httpx.post(service.callback_url(), json=body, timeout=5, trust_env=False)


def connect(service: Service, sent: bytes = UNFINISHED) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
    if sent:
        sock.sendall(sent)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the service closes this connection within `seconds`, reading what it sends."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


@contextlib.contextmanager
def slow_crowd(service: Service, size: int) -> Iterator[Callable[[], int]]:
    """Keep `size` connections with unfinished headers open, reopening each the service drops.

    Yields a function that tells how many connections have been opened so far.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * size)), hard))
    opened = 0
    stop = threading.Event()
    selector = selectors.DefaultSelector()

    def open_one() -> None:
        nonlocal opened
        try:
            sock = connect(service)
        except OSError:
            return  # the backlog is full for a moment: the next round tries again
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        opened += 1

    def keep_up() -> None:
        while not stop.is_set():
            for key, _ in selector.select(timeout=0.05):
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
            for _ in range(size - len(selector.get_map())):
                if stop.is_set():
                    break
                open_one()

    for _ in range(size):
        open_one()
    crowd = threading.Thread(target=keep_up, daemon=True)
    crowd.start()
    try:
        yield lambda: opened
    finally:
        stop.set()
        crowd.join(10)
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_genuine_deliveries_flow_while_thousands_of_requests_never_finish(
    services: Callable[..., Service],
) -> None:
    """2000 unfinished requests against a 1024 open-file limit; 20 deliveries all answered."""
    service = services(rlimits={resource.RLIMIT_NOFILE: 1024})
    with slow_crowd(service, SLOW) as opened:
        assert opened() >= SLOW
        answers = []
        for number in range(20):
            started = time.monotonic()
            response = delivery(service, number)  # fails with a timeout after 5 s
            answers.append((response.status_code, time.monotonic() - started))
            time.sleep(0.1)
        assert [status for status, _ in answers] == [200] * 20, answers
        assert opened() > SLOW  # the service dropped slow connections to make room
    assert service.api("/api/tasks/genuine-19").status_code == 200
    dropped = [e for e in service.log_entries() if e.get("message") == "dropped slow connections"]
    assert dropped and dropped[0]["limit"] <= 1024


def test_requests_slower_than_their_deadlines_are_dropped(
    services: Callable[..., Service],
) -> None:
    """Unfinished headers, an unfinished body and an idle connection: each closed in time."""
    service = services(env={"HEADER_TIMEOUT": "1", "BODY_TIMEOUT": "2"})
    with contextlib.ExitStack() as stack:
        idle = stack.enter_context(connect(service, b""))
        headers = stack.enter_context(connect(service))
        body = stack.enter_context(
            connect(
                service,
                b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 10,
            )
        )
        trickle = stack.enter_context(connect(service, b"P"))
        for _ in range(3):  # a byte every half second never finishes the headers
            time.sleep(0.5)
            trickle.sendall(b"O")
        for sock in (idle, headers, body, trickle):
            assert closed_within(sock, 4)
    assert delivery(service, 0).status_code == 200


def test_a_full_house_pushes_out_the_connection_waiting_longest(
    services: Callable[..., Service],
) -> None:
    """At MAX_CONNECTIONS, a new connection closes the oldest unfinished one, not itself."""
    service = services(env={"MAX_CONNECTIONS": "20"})
    with contextlib.ExitStack() as stack:
        crowd = [stack.enter_context(connect(service)) for _ in range(20)]
        assert delivery(service, 0).status_code == 200
        assert closed_within(crowd[0], 2)
        assert not closed_within(crowd[-1], 0.5)


def test_a_modestly_oversized_callback_reads_its_413(services: Callable[..., Service]) -> None:
    """5 MB against a 1 MiB limit: the sender gets the answer, not a reset connection."""
    service = services()
    body = json.dumps({"task_id": "big", "padding": "x" * (5 << 20)}).encode()
    request = urllib.request.Request(service.callback_url(), body, JSON)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"] == "body_too_large"
    refusals = [e for e in json_lines(service.log()) if e.get("reason") == "body_too_large"]
    assert len(refusals) == 1
