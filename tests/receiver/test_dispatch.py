"""The dispatcher against real loopback HTTP endpoints that misbehave on purpose, and a real
ledger: what an endpoint receives (the outbox's bytes, signed as Standard Webhooks says), what
the delivery log records, retries and their schedule, 410, redirects, slow and huge answers,
refused connections, the address check, per-task order, leases, expiry warnings and metrics.

Endpoints are `Endpoint`s: asyncio HTTP/1.1 servers on 127.0.0.1 that record every request
and answer as a script (or a function of the request) says. Waits are bounded (`eventually`);
nothing asserts how long something took. `quick_retries` shrinks the retry schedule so a test
can watch a delivery through its retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import shutil
import socket
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from receiver import dispatch, events
from receiver._clock import parse_time
from receiver.database import open_ledger
from receiver.dispatch import EXCERPT_BYTES, LEASE_SECONDS, Dispatcher, ExpiryWatch, dispatcher_for
from receiver.events import JITTER, MAX_RETRY_AFTER, SCHEDULE
from receiver.ledger import DeliveryAttempt, EventDelivery, EventOutbox, Ledger, LedgerUnavailable
from receiver.metrics import Metrics
from receiver.webhooks import WebhookKey
from storage import UrlPolicy
from tests.receiver.test_ledger import T2V_ID, body, succeed, update
from tests.receiver.test_outbox import doc, lifecycle, store_all
from tests.support import EVENT_WEBHOOK_SECRET, app_settings, free_port

pytestmark = pytest.mark.anyio

ALLOW_LOOPBACK = UrlPolicy(allow_private=True)
EPOCH = "1970-01-01T00:00:00.000Z"
ATTEMPTS = "kling_receiver_event_attempts_total"


@pytest.fixture
async def sqlite_ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    """A fresh SQLite ledger, for what the backend does not change."""
    async with open_ledger(f"sqlite:///{tmp_path}/ledger.db") as opened:
        yield opened


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry schedule, as long as ever but with 50 ms between attempts."""
    monkeypatch.setattr(events, "SCHEDULE", (0.0,) + (0.05,) * (len(SCHEDULE) - 1))


@pytest.fixture
def hosts(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Made-up host names, resolved to the addresses put in this dict (others as usual)."""
    names: dict[str, list[str]] = {}
    resolve = socket.getaddrinfo

    def made_up(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in names:
            return resolve(host, *args, **kwargs)
        return [info for address in names[host] for info in resolve(address, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", made_up)
    return names


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for the name localhost only (no address in it), and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    request = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2"
    names = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run([openssl, *request.split(), *names, *files], check=True, capture_output=True)
    return cert, key


# -- a loopback endpoint ---------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Answer with this status, headers and body, after `delay` seconds."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"thanks"
    delay: float = 0.0


@dataclass(frozen=True)
class Hang:
    """Read the request, then never answer (until the client hangs up)."""


@dataclass(frozen=True)
class Trickle:
    """Answer a byte every `every` seconds, forever: inside the headers, or in a 200's body."""

    in_headers: bool = False
    every: float = 0.05


Answer = Reply | Hang | Trickle


@dataclass(frozen=True)
class Received:
    """A request as the endpoint read it; header names in lower case."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def msg_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def status(self) -> str:
        """The task status a task event carries."""
        status: str = doc(self.body)["data"]["status"]
        return status


class Endpoint:
    """A real HTTP/1.1 server on 127.0.0.1 that records each request and answers as told:
    by a script (one answer per request, the last repeating), or by a function of the request."""

    def __init__(
        self,
        script: Sequence[Answer] = (),
        by: Callable[[Received], Answer] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.script = script
        self.by = by
        self.tls = tls
        self.requests: list[Received] = []
        self.overlaps: list[str] = []  # webhook-ids that arrived while one was being answered
        self._open: Counter[str] = Counter()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def url_at(self, host: str) -> str:
        """The endpoint's URL under another host name."""
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/hook"

    @property
    def url(self) -> str:
        return self.url_at("127.0.0.1")

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def received(self, count: int) -> None:
        """Wait until `count` requests have arrived."""

        async def arrived() -> bool:
            return len(self.requests) >= count

        await eventually(arrived, f"{count} request(s) at {self.url}")

    def _next(self, request: Received) -> Answer:
        if self.by is not None:
            return self.by(request)
        return self.script[min(len(self.requests), len(self.script)) - 1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while request := await _read_request(reader):
                msg_id = request.headers.get("webhook-id", "")
                if self._open[msg_id]:
                    self.overlaps.append(msg_id)
                self._open[msg_id] += 1
                self.requests.append(request)
                try:
                    await _answer(self._next(request), reader, writer)
                finally:
                    self._open[msg_id] -= 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, as it may
        finally:
            self._handlers.discard(task)
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> Received | None:
    line = await reader.readline()
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers = {}
    while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    content = await reader.readexactly(int(headers.get("content-length", "0")))
    return Received(method, target, headers, content)


async def _answer(
    answer: Answer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    if isinstance(answer, Hang):
        await reader.read()  # until the client hangs up
        raise ConnectionResetError
    if isinstance(answer, Trickle):
        head = b"HTTP/1.1 200 OK\r\nx-slow: " if answer.in_headers else _head(200, {}, 100_000)
        writer.write(head)
        while True:
            await writer.drain()
            await asyncio.sleep(answer.every)
            writer.write(b"x")
    await asyncio.sleep(answer.delay)
    writer.write(_head(answer.status, answer.headers, len(answer.body)) + answer.body)
    await writer.drain()


def _head(status: int, headers: dict[str, str], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Endpoint]]]:
    """Start `Endpoint`s: `await serve(Reply(500), Reply())` or `await serve(by=function)`,
    over TLS with `tls=` a server context."""
    started: list[Endpoint] = []

    async def start(
        *script: Answer,
        by: Callable[[Received], Answer] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Endpoint:
        endpoint = Endpoint(script, by, tls)
        await endpoint.start()
        started.append(endpoint)
        return endpoint

    yield start
    for endpoint in started:
        await endpoint.stop()


# -- helpers ---------------------------------------------------------------------------


def dispatcher(
    ledger: EventOutbox, policy: UrlPolicy = ALLOW_LOOPBACK, **options: Any
) -> Dispatcher:
    """A dispatcher signing with the test secret, looking at an empty outbox every 20 ms."""
    return Dispatcher(ledger, WebhookKey(EVENT_WEBHOOK_SECRET), policy, idle=0.02, **options)


def client() -> httpx.AsyncClient:
    """A client made as `Dispatcher.run` makes one for each endpoint, to call `attempt` with."""
    return httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=dispatch.TIMEOUT)


async def attempt_one(
    ledger: EventOutbox, sender: Dispatcher, attempts: int | None = None
) -> tuple[EventDelivery, DeliveryAttempt]:
    """Claim the oldest due delivery, attempt it once (as if `attempts` were behind it), and
    settle it as `run` would."""
    [job] = await ledger.claim_deliveries(sender.owner, LEASE_SECONDS, 1)
    if attempts is not None:
        job = dataclasses.replace(job, attempts=attempts)
    async with client() as http_client:
        attempt = await sender.attempt(http_client, job)
    assert await ledger.settle_delivery(job.id, sender.owner, attempt)
    return job, attempt


@asynccontextmanager
async def running(*senders: Dispatcher) -> AsyncIterator[None]:
    """Run dispatchers for the block; one that stopped by itself fails the test."""
    tasks = [asyncio.create_task(sender.run()) for sender in senders]
    try:
        yield
    finally:
        for task in tasks:
            assert not task.done(), task.exception()
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str | Callable[[], str], within: float = 20
) -> None:
    """Wait until `check()` holds; fail the test saying `what` (or what `what()` says)
    after `within` seconds, a bound only a hang or a bug reaches."""
    try:
        async with asyncio.timeout(within):
            while not await check():  # noqa: ASYNC110 (a database has no event to wait on)
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"not within {within} s: {what if isinstance(what, str) else what()}")


async def entry(ledger: EventOutbox, msg_id: str) -> dict[str, Any]:
    """The one delivery of an event, as the delivery log shows it."""
    log = await ledger.delivery_log(msg_id)
    assert log is not None
    [delivery] = log.deliveries
    return delivery


async def settled(ledger: EventOutbox, msg_id: str, attempts: int = 1) -> None:
    """Wait until the event's delivery has logged `attempts` attempts."""

    async def logged() -> bool:
        done: int = (await entry(ledger, msg_id))["attempts"]
        return done >= attempts

    await eventually(logged, f"{attempts} attempt(s) of {msg_id} logged")


async def task_events(ledger: Ledger, task_id: str = T2V_ID) -> list[str]:
    """The webhook-ids of a task's events, oldest first."""
    return [e.msg_id for e in await ledger.outbound_events(after=0, task_id=task_id)]


async def one_event(ledger: Ledger, task_id: str = "T1") -> str:
    """Write one task.updated event (a task heard of as submitted); its webhook-id."""
    await ledger.apply(update(body(task_id, "submitted")))
    [msg_id] = await task_events(ledger, task_id)
    return msg_id


def epoch(when: str | None) -> float:
    """A time the ledger wrote, as seconds since 1970."""
    assert when is not None
    return parse_time(when).timestamp()


def verified(request: Received) -> bool:
    """Whether the request's signature verifies under the secret, as a receiver checks it."""
    try:
        Webhook(EVENT_WEBHOOK_SECRET).verify(request.body, request.headers)
    except WebhookVerificationError:
        return False
    return True


# -- what an endpoint receives and the log records ---------------------------------------


async def test_an_event_is_sent_as_written_signed_and_logged(
    ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]]
) -> None:
    """Each event arrives once, in order, byte for byte, signed; the log shows the answer."""
    endpoint = await serve(Reply(204, body=b""), Reply(200, body=b'{"ok":true}'))
    url = endpoint.url + "?source=kling"
    await ledger.set_endpoints([url])
    await lifecycle(ledger)
    written = await ledger.outbound_events(after=0)
    async with running(dispatcher(ledger)):
        await settled(ledger, written[-1].msg_id)
    assert [r.msg_id for r in endpoint.requests] == [e.msg_id for e in written]
    for request, event in zip(endpoint.requests, written, strict=True):
        assert (request.method, request.target) == ("POST", "/hook?source=kling")
        assert request.body == event.body
        assert request.headers["content-type"] == "application/json"
        assert request.headers["host"] == f"127.0.0.1:{endpoint.port}"
        assert request.headers["webhook-signature"].startswith("v1,")
        assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
        assert verified(request)
        assert not verified(dataclasses.replace(request, body=request.body + b" "))
    assert [r.status for r in endpoint.requests] == ["submitted", "processing", "succeed"]
    first, last = await entry(ledger, written[0].msg_id), await entry(ledger, written[-1].msg_id)
    assert (first["state"], first["attempts"], first["last_status"]) == ("delivered", 1, 204)
    assert last["delivered_at"] is not None and last["next_attempt_at"] is None
    [tried] = last["log"]
    assert (tried["status"], tried["error"], tried["response"]) == (200, None, '{"ok":true}')
    assert tried["latency_ms"] > 0
    assert (await ledger.backlog()).undelivered_events == 0


async def test_every_retry_carries_the_same_webhook_id(
    sqlite_ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]], quick_retries: None
) -> None:
    """A 500 then a 200: two signed requests with one webhook-id and one body."""
    endpoint = await serve(Reply(500, body=b"busy"), Reply())
    await sqlite_ledger.set_endpoints([endpoint.url])
    msg_id = await one_event(sqlite_ledger)
    async with running(dispatcher(sqlite_ledger)):
        await settled(sqlite_ledger, msg_id, attempts=2)
    first, second = endpoint.requests
    assert first.msg_id == second.msg_id == msg_id
    assert first.body == second.body
    assert verified(first) and verified(second)
    logged = await entry(sqlite_ledger, msg_id)
    assert (logged["state"], logged["attempts"]) == ("delivered", 2)
    assert [(a["status"], a["error"], a["response"]) for a in logged["log"]] == [
        (500, "HTTP 500", "busy"),
        (200, None, "thanks"),
    ]


# -- retries and their schedule ----------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "low", "high"),
    [
        (lambda: None, SCHEDULE[1] * (1 - JITTER), SCHEDULE[1] * (1 + JITTER)),
        (lambda: "120", 120, 120),
        (lambda: str(int(MAX_RETRY_AFTER) * 24), MAX_RETRY_AFTER, MAX_RETRY_AFTER),
        (lambda: formatdate(time.time() + 300, usegmt=True), 298, 300),  # whole seconds
    ],
    ids=["schedule", "retry-after", "retry-after-capped", "retry-after-date"],
)
async def test_a_failure_is_tried_again_after_the_schedule_or_retry_after(
    sqlite_ledger: Ledger,
    serve: Callable[..., Awaitable[Endpoint]],
    retry_after: Callable[[], str | None],
    low: float,
    high: float,
) -> None:
    """A 500 waits the first retry's 5 s ±10%, or as long as Retry-After asks, up to an hour."""
    value = retry_after()
    headers = {} if value is None else {"retry-after": value}
    endpoint = await serve(Reply(500, headers, b"later"))
    await sqlite_ledger.set_endpoints([endpoint.url])
    msg_id = await one_event(sqlite_ledger)
    before = time.time()
    _, attempt = await attempt_one(sqlite_ledger, dispatcher(sqlite_ledger))
    after = time.time()
    assert (attempt.state, attempt.status, attempt.error) == ("pending", 500, "HTTP 500")
    retry_at = epoch(attempt.retry_at)
    assert before + low - 0.001 <= retry_at <= after + high + 0.001  # stamps keep milliseconds
    logged = await entry(sqlite_ledger, msg_id)
    assert logged["next_attempt_at"] == attempt.retry_at and logged["last_status"] == 500
    assert await sqlite_ledger.claim_deliveries("probe", 60, 10) == []  # not due before then


async def test_the_schedule_ends_in_failed_and_the_task_moves_on(
    ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]]
) -> None:
    """After len(SCHEDULE) attempts a delivery is failed, and its task's next event is due."""
    endpoint = await serve(Reply(503, body=b"down"))
    await ledger.set_endpoints([endpoint.url])
    await lifecycle(ledger)
    first, second, _ = await task_events(ledger)
    sender = dispatcher(ledger)
    [job] = await ledger.claim_deliveries(sender.owner, LEASE_SECONDS, 1)
    before = time.time()
    async with client() as http_client:
        last_but_one = await sender.attempt(
            http_client, dataclasses.replace(job, attempts=len(SCHEDULE) - 2)
        )
        attempt = await sender.attempt(
            http_client, dataclasses.replace(job, attempts=len(SCHEDULE) - 1)
        )
    assert last_but_one.state == "pending"  # in SCHEDULE[-1] (10 h) ±10%
    assert epoch(last_but_one.retry_at) >= before + SCHEDULE[-1] * (1 - JITTER) - 0.001
    assert await ledger.settle_delivery(job.id, sender.owner, attempt)
    assert job.event.msg_id == first
    assert (attempt.state, attempt.status, attempt.retry_at) == ("failed", 503, None)
    logged = await entry(ledger, first)
    assert (logged["state"], logged["next_attempt_at"], logged["last_error"]) == (
        "failed",
        None,
        "HTTP 503",
    )
    [following] = await ledger.claim_deliveries("probe", 60, 10)
    assert following.event.msg_id == second


async def test_a_task_that_keeps_failing_is_tried_len_schedule_times(
    sqlite_ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]], quick_retries: None
) -> None:
    """Through run(): exactly len(SCHEDULE) requests for the failing event, then the next."""
    ledger = sqlite_ledger
    endpoint = await serve(Reply())
    await ledger.set_endpoints([endpoint.url])
    await lifecycle(ledger)
    first, second, third = await task_events(ledger)
    endpoint.by = lambda request: Reply(500) if request.msg_id == first else Reply()
    async with running(dispatcher(ledger)):
        await settled(ledger, third)
    assert [r.msg_id for r in endpoint.requests] == [first] * len(SCHEDULE) + [second, third]
    logged = await entry(ledger, first)
    assert (logged["state"], logged["attempts"]) == ("failed", len(SCHEDULE))


# -- what the endpoint answers -----------------------------------------------------------


async def test_gone_stops_the_endpoint_until_a_replay_takes_it_back(
    ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]]
) -> None:
    """410 flags the endpoint: its deliveries stay pending, unclaimed, until a replay to it."""
    endpoint = await serve(Reply(410, body=b"no such hook"), Reply())
    await ledger.set_endpoints([endpoint.url])
    await lifecycle(ledger)
    await ledger.apply(update(succeed("OTHER", images=1)))
    first = (await task_events(ledger))[0]
    job, attempt = await attempt_one(ledger, dispatcher(ledger))
    assert job.event.msg_id == first
    assert (attempt.state, attempt.status, attempt.retry_at) == ("gone", 410, None)
    logged = await entry(ledger, first)
    assert (logged["state"], logged["last_status"], logged["attempts"]) == ("pending", 410, 1)
    assert logged["log"][0]["response"] == "no such hook"
    assert await ledger.claim_deliveries("probe", 60, 10) == []  # not even the other task's
    assert len(endpoint.requests) == 1
    assert await ledger.replay(EPOCH, [], endpoint.url) == 4
    [again] = await ledger.claim_deliveries("probe", 0.001, 1)
    assert (again.id, again.event.msg_id, again.attempts) == (job.id, first, 1)
    await asyncio.sleep(0.01)  # the probe's lease lapses
    _, delivered = await attempt_one(ledger, dispatcher(ledger))
    assert delivered.state == "delivered"
    assert [r.msg_id for r in endpoint.requests] == [first, first]


async def test_a_redirect_is_not_followed(
    sqlite_ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]]
) -> None:
    """A 302 to another loopback server is a failed attempt; the other server hears nothing."""
    elsewhere = await serve(Reply())
    endpoint = await serve(Reply(302, {"location": elsewhere.url}, b"moved"))
    await sqlite_ledger.set_endpoints([endpoint.url])
    msg_id = await one_event(sqlite_ledger)
    async with running(dispatcher(sqlite_ledger)):
        await settled(sqlite_ledger, msg_id)
    logged = await entry(sqlite_ledger, msg_id)
    assert (logged["state"], logged["last_status"], logged["last_error"]) == (
        "pending",
        302,
        "HTTP 302",
    )
    assert len(endpoint.requests) == 1
    assert elsewhere.requests == []


@pytest.mark.parametrize(
    "slow",
    [Hang(), Trickle(in_headers=True), Trickle(in_headers=False)],
    ids=["silent", "trickled-headers", "trickled-body"],
)
async def test_a_slow_endpoint_is_cut_at_the_timeout(
    sqlite_ledger: Ledger,
    serve: Callable[..., Awaitable[Endpoint]],
    monkeypatch: pytest.MonkeyPatch,
    slow: Answer,
) -> None:
    """An endpoint that never finishes answering costs one TIMEOUT, then a retry."""
    monkeypatch.setattr(dispatch, "TIMEOUT", 1.0)
    endpoint = await serve(slow)
    await sqlite_ledger.set_endpoints([endpoint.url])
    await one_event(sqlite_ledger)
    sender = dispatcher(sqlite_ledger)
    [job] = await sqlite_ledger.claim_deliveries(sender.owner, LEASE_SECONDS, 1)
    # A client without timeouts of its own: the bound is the attempt's.
    async with httpx.AsyncClient(timeout=None) as patient, asyncio.timeout(10):
        attempt = await sender.attempt(patient, job)
    assert (attempt.state, attempt.status) == ("pending", None)
    assert attempt.error == "no answer within 1 s"
    assert attempt.latency_ms >= 1000
    assert len(endpoint.requests) == 1


async def test_only_the_start_of_a_huge_answer_is_kept_and_made_printable(
    sqlite_ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]]
) -> None:
    """Of a megabyte answer, EXCERPT_BYTES are logged, control bytes replaced."""
    start = b"ok\x00\x07\x1b[2J\x7f\r\n\tdone " + "é".encode()
    endpoint = await serve(Reply(200, body=start + b"A" * 1_000_000))
    await sqlite_ledger.set_endpoints([endpoint.url])
    msg_id = await one_event(sqlite_ledger)
    _, attempt = await attempt_one(sqlite_ledger, dispatcher(sqlite_ledger))
    kept = "ok\ufffd\ufffd\ufffd[2J\ufffd\ufffd\n\tdone é"
    assert attempt.state == "delivered"
    assert attempt.response == kept + "A" * (EXCERPT_BYTES - len(start))
    assert (await entry(sqlite_ledger, msg_id))["log"][0]["response"] == attempt.response


async def test_a_refused_connection_is_tried_again(sqlite_ledger: Ledger) -> None:
    """Nothing listening: a retry in about 5 s, with the connection error logged."""
    url = f"http://127.0.0.1:{free_port()}/hook"
    await sqlite_ledger.set_endpoints([url])
    msg_id = await one_event(sqlite_ledger)
    before = time.time()
    _, attempt = await attempt_one(sqlite_ledger, dispatcher(sqlite_ledger))
    assert (attempt.state, attempt.status) == ("pending", None)
    assert attempt.error is not None and attempt.error.startswith("ConnectError")
    assert epoch(attempt.retry_at) >= before + SCHEDULE[1] * (1 - JITTER) - 0.001
    assert (await entry(sqlite_ledger, msg_id))["last_error"] == attempt.error


async def test_an_endpoint_is_reached_at_the_next_address_when_one_refuses(
    sqlite_ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]], hosts: dict[str, list[str]]
) -> None:
    """A host name whose first address refuses (IPv6 down, one node out) is sent to the next."""
    endpoint = await serve(Reply())
    # Nothing listens on ::1 (or it is unreachable): the connection there fails at once.
    hosts["hook.test"] = ["::1", "127.0.0.1"]
    await sqlite_ledger.set_endpoints([endpoint.url_at("hook.test")])
    msg_id = await one_event(sqlite_ledger)
    _, attempt = await attempt_one(sqlite_ledger, dispatcher(sqlite_ledger))
    assert (attempt.state, attempt.status, attempt.error) == ("delivered", 200, None)
    [request] = endpoint.requests
    assert request.msg_id == msg_id and request.headers["host"] == f"hook.test:{endpoint.port}"


async def test_https_is_verified_for_each_endpoint_host_name(
    sqlite_ledger: Ledger,
    serve: Callable[..., Awaitable[Endpoint]],
    hosts: dict[str, list[str]],
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connected by address, TLS still checks the endpoint's name (SNI), and a connection made
    for one name never carries another's event, though both share an address (as on a CDN)."""
    cert, key = certificate
    monkeypatch.setattr(certifi, "where", lambda: str(cert))  # the CAs httpx trusts
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    endpoint = await serve(Reply(), tls=server_side)
    hosts["other.test"] = ["127.0.0.1"]  # not a name the certificate is for
    ledger = sqlite_ledger
    async with running(dispatcher(ledger)):
        await ledger.set_endpoints([endpoint.url_at("localhost")])
        mine = await one_event(ledger, "T1")
        await settled(ledger, mine)
        # The connection to localhost stays open; the other name must make its own.
        await ledger.set_endpoints([endpoint.url_at("other.test")])
        theirs = await one_event(ledger, "T2")
        await settled(ledger, theirs)
    assert (await entry(ledger, mine))["state"] == "delivered"
    sent = [(r.msg_id, r.headers["host"]) for r in endpoint.requests]
    assert sent == [(mine, f"localhost:{endpoint.port}")]
    refused = await entry(ledger, theirs)
    assert refused["state"] == "pending" and refused["last_status"] is None
    assert "certificate" in refused["last_error"] and "other.test" in refused["last_error"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("allowed", [False, True], ids=["default", "allowed"])
async def test_private_endpoints_are_refused_unless_allowed(
    sqlite_ledger: Ledger,
    serve: Callable[..., Awaitable[Endpoint]],
    tmp_path: Path,
    host: str,
    allowed: bool,
) -> None:
    """The settings' dispatcher refuses loopback without connecting, naming the setting."""
    endpoint = await serve(Reply())
    await sqlite_ledger.set_endpoints([endpoint.url.replace("127.0.0.1", host)])
    msg_id = await one_event(sqlite_ledger)
    settings = app_settings(tmp_path, allow_private_event_urls=allowed)
    sender = dispatcher_for(settings, sqlite_ledger, Metrics())
    _, attempt = await attempt_one(sqlite_ledger, sender)
    if allowed:
        assert attempt.state == "delivered"
        assert endpoint.requests[0].headers["host"] == f"{host}:{endpoint.port}"
        return
    assert (attempt.state, attempt.status) == ("pending", None)
    assert attempt.error is not None
    assert "127.0.0.1" in attempt.error and "ALLOW_PRIVATE_EVENT_URLS=true" in attempt.error
    assert endpoint.requests == []
    assert (await entry(sqlite_ledger, msg_id))["last_error"] == attempt.error


# -- order, leases, expiry, metrics ----------------------------------------------------


async def test_a_failing_event_holds_back_its_own_task_only(
    ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]]
) -> None:
    """While a task's first event waits for its retry, its later ones wait; others go."""

    def answer(request: Received) -> Answer:
        if doc(request.body)["data"]["task_id"] == T2V_ID:
            return Reply(500, {"retry-after": "3600"})
        return Reply()

    endpoint = await serve(by=answer)
    await ledger.set_endpoints([endpoint.url])
    await lifecycle(ledger)
    await ledger.apply(update(succeed("OTHER", images=1)))
    await ledger.apply(update(body("THIRD", "processing")))
    first = (await task_events(ledger))[0]
    others = await task_events(ledger, "OTHER") + await task_events(ledger, "THIRD")
    async with running(dispatcher(ledger)):
        for msg_id in [first, *others]:
            await settled(ledger, msg_id)
        assert await ledger.claim_deliveries("probe", 60, 10) == []
    assert sorted(r.msg_id for r in endpoint.requests) == sorted([first, *others])
    assert (await entry(ledger, first))["state"] == "pending"
    assert [(await entry(ledger, m))["state"] for m in others] == ["delivered"] * len(others)


async def test_a_task_events_arrive_in_order_across_retries(
    sqlite_ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]], quick_retries: None
) -> None:
    """Each event fails twice; the endpoint still sees the task's events strictly in order."""
    seen: Counter[str] = Counter()

    def answer(request: Received) -> Answer:
        seen[request.msg_id] += 1
        return Reply() if seen[request.msg_id] > 2 else Reply(502)

    endpoint = await serve(by=answer)
    await sqlite_ledger.set_endpoints([endpoint.url])
    await lifecycle(sqlite_ledger)
    written = await task_events(sqlite_ledger)
    async with running(dispatcher(sqlite_ledger)):
        await settled(sqlite_ledger, written[-1], attempts=3)
    assert [r.msg_id for r in endpoint.requests] == [m for m in written for _ in range(3)]


async def test_two_dispatchers_never_send_one_delivery_twice(
    ledger_url: str, serve: Callable[..., Awaitable[Endpoint]]
) -> None:
    """Two senders (two owners, two connections) on one ledger: each delivery is sent once."""
    endpoint = await serve(Reply(delay=0.05))
    async with open_ledger(ledger_url) as one, open_ledger(ledger_url) as two:
        await one.set_endpoints([endpoint.url])
        for n in range(8):
            await one.apply(update(body(f"T{n}", "submitted", updated_at=1)))
            await one.apply(update(body(f"T{n}", "processing", updated_at=2)))
            await one.apply(update(succeed(f"T{n}", images=1, updated_at=3)))
        written = [e.msg_id for e in await one.outbound_events(after=0, limit=100)]
        assert len(written) == 24
        senders = [dispatcher(one), dispatcher(two)]
        async with running(*senders):
            for msg_id in written:
                await settled(one, msg_id)
    assert endpoint.overlaps == []
    assert sorted(r.msg_id for r in endpoint.requests) == sorted(written)
    sent = [
        s.metrics.registry.get_sample_value(ATTEMPTS, {"outcome": "delivered"}) for s in senders
    ]
    assert sum(s or 0 for s in sent) == 24 and all(sent), sent  # both took part


async def test_expiry_warnings_are_raised_once_by_the_turn_holder(ledger: Ledger) -> None:
    """Unstored files past the horizon raise asset.expiring once; only one process looks."""
    old = int((time.time() - 26 * 86400) * 1000)
    await ledger.apply(update(succeed("STORED", images=1, created_at=old)))
    await store_all(ledger)
    await ledger.apply(update(succeed("OLD", images=2, created_at=old)))
    await ledger.apply(update(succeed("NEW", images=1, created_at=int(time.time() * 1000))))
    holder = ExpiryWatch(ledger, warn_days=25, owner="holder", batch=1)
    other = ExpiryWatch(ledger, warn_days=25, owner="other")
    assert await holder.once() == 2
    assert await holder.once() == 0
    await ledger.apply(update(succeed("LATER", images=1, created_at=old)))
    assert await other.once() == 0  # the turn is the holder's
    assert await holder.once() == 1
    expiring = await ledger.outbound_events(after=0, type="asset.expiring")
    assert [e.task_id for e in expiring] == ["OLD", "OLD", "LATER"]
    assert all(doc(e.body)["type"] == "asset.expiring" for e in expiring)
    expected = {"holder": 3.0, "other": 0.0}
    for watch in (holder, other):
        warned = watch.metrics.registry.get_sample_value("kling_receiver_expiry_warnings_total")
        assert warned == expected[watch.owner]


async def test_attempts_are_counted_by_outcome(
    sqlite_ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]], quick_retries: None
) -> None:
    """Delivered, retry, failed and gone attempts land in the events counter as logged."""
    ledger = sqlite_ledger
    ok, down, gone = await serve(Reply()), await serve(Reply(500)), await serve(Reply(410))
    await ledger.set_endpoints([ok.url, down.url, gone.url])
    await lifecycle(ledger)
    sender = dispatcher(ledger)
    expected = {"delivered": 3.0, "retry": 3.0 * (len(SCHEDULE) - 1), "failed": 3.0, "gone": 1.0}

    def counts() -> dict[str, float | None]:
        return {
            k: sender.metrics.registry.get_sample_value(ATTEMPTS, {"outcome": k}) for k in expected
        }

    last = (await task_events(ledger))[-1]

    async def finished() -> bool:
        # Its attempt at the endpoint that is down is the last to be settled (and counted).
        log = await ledger.delivery_log(last)
        assert log is not None
        return sorted(d["state"] for d in log.deliveries) == ["delivered", "failed", "pending"]

    async with running(sender):
        await eventually(finished, lambda: f"the last event settled (counts {counts()})")
    assert counts() == expected
    assert len(down.requests) == 3 * len(SCHEDULE) and len(gone.requests) == 1
    seconds = sender.metrics.registry.get_sample_value("kling_receiver_event_attempt_seconds_count")
    assert seconds == sum(expected.values())


class Stuttering:
    """A ledger whose first claims and settles fail as an unreachable database does."""

    def __init__(self, ledger: Ledger, failures: int) -> None:
        self.ledger = ledger
        self.failures = {"claim": failures, "settle": failures}

    def _fail(self, what: str) -> None:
        if self.failures[what]:
            self.failures[what] -= 1
            raise LedgerUnavailable("the database does not answer")

    async def claim_deliveries(self, owner: str, lease: float, limit: int) -> list[EventDelivery]:
        self._fail("claim")
        return await self.ledger.claim_deliveries(owner, lease, limit)

    async def settle_delivery(self, delivery_id: int, owner: str, attempt: DeliveryAttempt) -> bool:
        self._fail("settle")
        return await self.ledger.settle_delivery(delivery_id, owner, attempt)


async def test_a_ledger_that_stops_answering_does_not_stop_the_dispatcher(
    sqlite_ledger: Ledger, serve: Callable[..., Awaitable[Endpoint]]
) -> None:
    """Failed claims are tried again, and a failed settle is retried until it is recorded."""
    endpoint = await serve(Reply())
    await sqlite_ledger.set_endpoints([endpoint.url])
    msg_id = await one_event(sqlite_ledger)
    stuttering = Stuttering(sqlite_ledger, failures=2)
    async with running(dispatcher(stuttering)):  # type: ignore[arg-type]
        await settled(sqlite_ledger, msg_id)
    assert stuttering.failures == {"claim": 0, "settle": 0}
    assert [r.msg_id for r in endpoint.requests] == [msg_id]
    assert (await entry(sqlite_ledger, msg_id))["state"] == "delivered"


async def test_stopping_the_dispatcher_abandons_attempts_in_flight(
    sqlite_ledger: Ledger,
    serve: Callable[..., Awaitable[Endpoint]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled mid-attempt, run() ends at once; once the lease lapses another sender has it."""
    monkeypatch.setattr(dispatch, "LEASE_SECONDS", 0.2)
    endpoint = await serve(Hang())
    await sqlite_ledger.set_endpoints([endpoint.url])
    msg_id = await one_event(sqlite_ledger)
    task = asyncio.create_task(dispatcher(sqlite_ledger).run())
    await endpoint.received(1)
    task.cancel()
    async with asyncio.timeout(5):  # well before the attempt's own TIMEOUT (15 s)
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert (await entry(sqlite_ledger, msg_id))["attempts"] == 0  # nothing recorded

    async def taken_over() -> bool:
        return bool(await sqlite_ledger.claim_deliveries("another", 60, 1))

    await eventually(taken_over, "the lapsed lease taken over")
