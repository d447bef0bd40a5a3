"""The dispatcher: leases outbound event deliveries from the outbox, signs them, sends them.

Every process may run one; leases keep each delivery with one sender at a time, and the
outbox hands out a task's events to an endpoint one after the other, so they arrive in
order. An attempt is bounded to `TIMEOUT` seconds from resolving the endpoint to the
last byte read of its answer; redirects are not followed; the endpoint's address is
checked like a download's (`storage.UrlPolicy`) and the connection goes to the address
that was checked. A 2xx answer delivers; 410 says the endpoint is gone (it is flagged and
its queue waits for a replay to it); anything else is tried again on the schedule of
`receiver.events`, or with the wait a Retry-After asks for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx

from receiver._clock import stamp, utc_now, wait_for_event
from receiver._redact import redact_url
from receiver.events import next_delay
from receiver.ledger import (
    DeliveryAttempt,
    EventDelivery,
    EventOutbox,
    Ledger,
    LedgerUnavailable,
    lease_owner,
)
from receiver.metrics import Metrics
from receiver.settings import Settings
from receiver.webhooks import WebhookKey
from storage import RefusedURL, UrlPolicy
from storage.fetch import retry_after_seconds
from storage.guard import Target

__all__ = ["TIMEOUT", "Dispatcher", "ExpiryWatch", "dispatcher_for"]

log = logging.getLogger("receiver.dispatch")

TIMEOUT = 15.0  # seconds an attempt may take, start to finish
LEASE_SECONDS = 60.0  # longer than an attempt and its recording take
EXCERPT_BYTES = 512  # of an answer's body, kept in the delivery log
_IDLE = 0.5  # seconds between looks at an empty outbox
_USER_AGENT = "kling-receiver"


@dataclass
class Dispatcher:
    """Sends due deliveries, `concurrency` at a time, until cancelled."""

    ledger: EventOutbox
    key: WebhookKey
    policy: UrlPolicy
    concurrency: int = 4
    metrics: Metrics = field(default_factory=Metrics)
    # Tests only: one transport shared by every endpoint's client; the default connects out.
    transport: httpx.AsyncBaseTransport | None = None
    owner: str = field(default_factory=lease_owner)
    idle: float = _IDLE

    async def run(self) -> None:
        # A client, so a pool of connections, for each endpoint: connections go to checked
        # addresses and are pooled by address, so a shared pool would carry one host name's
        # events over a TLS connection made (and verified) for another name at that address.
        clients: dict[str, httpx.AsyncClient] = {}
        sending: set[asyncio.Task[None]] = set()
        done = asyncio.Event()
        complained = False

        def finished(task: asyncio.Task[None]) -> None:
            sending.discard(task)
            done.set()

        try:
            while True:
                free = self.concurrency - len(sending)
                done.clear()
                if free <= 0:
                    await done.wait()
                    continue
                try:
                    jobs = await self.ledger.claim_deliveries(self.owner, LEASE_SECONDS, free)
                    complained = False
                except LedgerUnavailable as exc:
                    if not complained:
                        log.error("cannot claim events to send", extra={"error": str(exc)})
                    complained = True
                    jobs = []
                if not jobs:
                    # A delivery ending may free its task's next event: look again at once.
                    await wait_for_event(done, self.idle)
                    continue
                for job in jobs:
                    client = clients.get(job.endpoint)
                    if client is None:
                        client = clients[job.endpoint] = self._client()
                    task = asyncio.create_task(self._deliver(client, job))
                    sending.add(task)
                    task.add_done_callback(finished)
        finally:
            for task in sending:
                task.cancel()  # their leases lapse; another sender takes them over
            await asyncio.gather(*sending, return_exceptions=True)
            for client in clients.values():
                await client.aclose()

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            follow_redirects=False, trust_env=False, timeout=TIMEOUT, transport=self.transport
        )

    async def _deliver(self, client: httpx.AsyncClient, job: EventDelivery) -> None:
        """Send one delivery and record how it went; never raises but cancellation."""
        try:
            attempt = await self.attempt(client, job)
        except Exception:  # the edge of a job: a bug here must not stop the dispatcher
            log.exception("event attempt failed unexpectedly", extra={"msg_id": job.event.msg_id})
            attempt = self._outcome(job, time.monotonic(), None, "internal error", None)
        outcome = "retry" if attempt.state == "pending" else attempt.state
        self.metrics.events.labels(outcome).inc()
        self.metrics.event_seconds.observe(attempt.latency_ms / 1000)
        log_at = logging.INFO if attempt.state == "delivered" else logging.WARNING
        log.log(
            log_at,
            f"event {outcome}",
            extra={
                "msg_id": job.event.msg_id,
                "type": job.event.type,
                "task_id": job.event.task_id,
                "endpoint": redact_url(job.endpoint),
                "status": attempt.status,
                "error": attempt.error,
                "attempts": job.attempts + 1,
                "retry_at": attempt.retry_at,
            },
        )
        wait = 0.1
        while True:
            try:
                await self.ledger.settle_delivery(job.id, self.owner, attempt)
                return
            except LedgerUnavailable:
                # Until the lease runs out: after that another sender has it, and sends again
                # with the same webhook-id, which a receiver takes as the same event.
                if wait > LEASE_SECONDS:
                    log.error("cannot record an event attempt", extra={"msg_id": job.event.msg_id})
                    return
                await asyncio.sleep(wait)
                wait *= 2

    async def attempt(self, client: httpx.AsyncClient, job: EventDelivery) -> DeliveryAttempt:
        """One signed POST of the event to its endpoint, and what becomes of the delivery.

        `client` serves this endpoint alone (see `run`).
        """
        started = time.monotonic()
        event = job.event
        try:
            async with asyncio.timeout(TIMEOUT):
                target = await asyncio.to_thread(self.policy.resolve, job.endpoint)
                url = httpx.URL(job.endpoint)
                timestamp = int(time.time())
                headers = {
                    "content-type": "application/json",
                    "user-agent": _USER_AGENT,
                    "host": url.netloc.decode("ascii"),
                    "webhook-id": event.msg_id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": self.key.sign(event.msg_id, timestamp, event.body),
                }
                response = await _send(client, target, url, headers, event.body)
                try:
                    excerpt = await _excerpt(response)
                finally:
                    await response.aclose()
        except TimeoutError:
            return self._outcome(job, started, None, f"no answer within {TIMEOUT:g} s", None)
        except RefusedURL as exc:
            return self._outcome(job, started, None, exc.reason, None)
        except httpx.HTTPError as exc:
            return self._outcome(job, started, None, _describe(exc), None)
        status = response.status_code
        if 200 <= status < 300:
            return DeliveryAttempt("delivered", utc_now(), _since(started), status, None, excerpt)
        if status == 410:
            return DeliveryAttempt(
                "gone", utc_now(), _since(started), status, "the endpoint is gone (410)", excerpt
            )
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        return self._outcome(job, started, status, f"HTTP {status}", excerpt, retry_after)

    def _outcome(
        self,
        job: EventDelivery,
        started: float,
        status: int | None,
        error: str,
        excerpt: str | None,
        retry_after: float | None = None,
    ) -> DeliveryAttempt:
        """A failed attempt: tried again when the schedule allows, else failed for good."""
        delay = next_delay(job.attempts + 1, retry_after)
        if delay is None:
            return DeliveryAttempt("failed", utc_now(), _since(started), status, error, excerpt)
        retry_at = stamp(time.time() + delay)
        return DeliveryAttempt(
            "pending", utc_now(), _since(started), status, error, excerpt, retry_at
        )


async def _send(
    client: httpx.AsyncClient,
    target: Target,
    url: httpx.URL,
    headers: dict[str, str],
    content: bytes,
) -> httpx.Response:
    """POST to the checked addresses in turn until one takes the connection, as downloads do:
    a host whose first address refuses (its IPv6 is down, one node is out) is reached at the
    next. The last connection error is raised when none does."""
    failed: httpx.ConnectError | None = None
    for address in target.addresses:
        request = client.build_request(
            "POST",
            url.copy_with(host=address),
            content=content,
            headers=headers,
            extensions={"sni_hostname": target.host},
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            failed = exc
    assert failed is not None  # UrlPolicy.resolve never returns a target without addresses
    raise failed


async def _excerpt(response: httpx.Response) -> str:
    """The start of an answer's body, as text safe to log and show."""
    kept = bytearray()
    async for chunk in response.aiter_raw():
        kept += chunk[: EXCERPT_BYTES - len(kept)]
        if len(kept) >= EXCERPT_BYTES:
            break
    text = kept.decode("utf-8", "replace")
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


def _since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass
class ExpiryWatch:
    """Raises `asset.expiring` for files still not stored EXPIRY_WARN_DAYS after their task
    began, once across the fleet (the process holding the `expiry` turn looks)."""

    ledger: Ledger
    warn_days: float
    metrics: Metrics = field(default_factory=Metrics)
    interval: float = 300.0
    owner: str = field(default_factory=lease_owner)
    batch: int = 500

    async def run(self) -> None:
        while True:
            # A pause first: a process starting (or restarting in a loop) does no extra work.
            await asyncio.sleep(self.interval)
            try:
                await self.once()
            except LedgerUnavailable as exc:
                log.error("cannot look for files near expiry", extra={"error": str(exc)})

    async def once(self) -> int:
        """Look once, if this process holds the turn; returns how many files were found."""
        if not await self.ledger.take_turn("expiry", self.owner, self.interval * 1.5):
            return 0
        horizon = time.time() - self.warn_days * 86400
        found = 0
        while True:
            raised = await self.ledger.warn_expiring(horizon, self.batch)
            found += raised
            if raised < self.batch:
                break
        if found:
            self.metrics.expiry_warnings.inc(found)
            log.warning(
                "files near expiry are not stored yet",
                extra={"assets": found, "warn_days": self.warn_days},
            )
        return found


def dispatcher_for(settings: Settings, ledger: EventOutbox, metrics: Metrics) -> Dispatcher:
    """The dispatcher the settings describe: EVENT_WEBHOOK_SECRET signs, and endpoint
    addresses are checked unless ALLOW_PRIVATE_EVENT_URLS."""
    return Dispatcher(
        ledger,
        WebhookKey(settings.secret("event_webhook_secret")),
        UrlPolicy(
            allow_private=settings.allow_private_event_urls,
            allow_setting="ALLOW_PRIVATE_EVENT_URLS",
        ),
        concurrency=settings.event_dispatch_concurrency,
        metrics=metrics,
    )
