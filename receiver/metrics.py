"""Prometheus metrics: what this process did, and the backlog the ledger holds.

Counters and histograms live in a registry of each app's own (never the global
one: many apps share a test process) and count where the event is already
logged, through the one `Metrics` object the app hands its parts. Gauges of
the backlog are read from the ledger at each scrape, so they agree across
processes and survive restarts. Labels come from small fixed sets (outcomes,
error codes, sources), never task ids or URLs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from receiver._clock import parse_time
from receiver.ledger import Backlog, Ledger, LedgerUnavailable, Outcome

__all__ = ["CONTENT_TYPE", "EVENT_OUTCOMES", "Metrics", "scrape"]

log = logging.getLogger("receiver.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "kling_receiver"
# A scrape waits this long for the ledger, then answers without its gauges.
BACKLOG_TIMEOUT = 5.0
# The error codes the callback endpoint refuses a delivery with (`receiver.routes.callbacks`).
REFUSALS = (
    "unknown_callback_url",
    "body_too_large",
    "disconnected",
    "bad_signature",
    "bad_json",
    "bad_shape",
    "wrong_task",
)
# How an attempt to send an outbound event ends (`receiver.dispatch`).
EVENT_OUTCOMES = ("delivered", "retry", "failed", "gone")
# Acknowledging a delivery takes milliseconds; anything near a second is trouble.
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A download runs from a fraction of a second to the 10 minutes of a large video.
DOWNLOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """This process's counters and histograms, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.deliveries = Counter(
            f"{PREFIX}_deliveries",
            "Callback deliveries recorded, by what applying them did (moved, kept, duplicate,"
            " held).",
            ["outcome"],
            registry=registry,
        )
        self.refused = Counter(
            f"{PREFIX}_deliveries_refused",
            "Callback deliveries refused, by the error code the answer carried.",
            ["reason"],
            registry=registry,
        )
        self.ack_seconds = Histogram(
            f"{PREFIX}_delivery_ack_seconds",
            "Time from a delivery's arrival to its recorded answer.",
            buckets=ACK_BUCKETS,
            registry=registry,
        )
        self.duplicates = Counter(
            f"{PREFIX}_duplicate_deliveries",
            "Deliveries whose exact bytes were recorded before.",
            registry=registry,
        )
        self.out_of_order = Counter(
            f"{PREFIX}_out_of_order_deliveries",
            "Deliveries of a known status that came after a later one and moved nothing.",
            registry=registry,
        )
        self.polls = Counter(
            f"{PREFIX}_polls",
            "Tasks queried at Kling because their callbacks went quiet, by result.",
            ["result"],
            registry=registry,
        )
        self.verifications = Counter(
            f"{PREFIX}_verifications",
            "Queries confirming a succeed callback before its files are queued.",
            registry=registry,
        )
        self.recoveries = Counter(
            f"{PREFIX}_recoveries",
            "Tasks whose end was learned without a callback, by source (poll, sweep).",
            ["source"],
            registry=registry,
        )
        self.downloads = Counter(
            f"{PREFIX}_downloads",
            "Download attempts by outcome (stored, retry, failed).",
            ["outcome"],
            registry=registry,
        )
        self.downloaded_bytes = Counter(
            f"{PREFIX}_downloaded_bytes",
            "Bytes of the files stored.",
            registry=registry,
        )
        self.download_seconds = Histogram(
            f"{PREFIX}_download_seconds",
            "Duration of download attempts, by outcome.",
            ["outcome"],
            buckets=DOWNLOAD_BUCKETS,
            registry=registry,
        )
        self.events = Counter(
            f"{PREFIX}_event_attempts",
            "Attempts to send an outbound event, by outcome (delivered, retry, failed, gone).",
            ["outcome"],
            registry=registry,
        )
        self.event_seconds = Histogram(
            f"{PREFIX}_event_attempt_seconds",
            "Duration of attempts to send an outbound event.",
            buckets=(*ACK_BUCKETS, 15.0),
            registry=registry,
        )
        self.expiry_warnings = Counter(
            f"{PREFIX}_expiry_warnings",
            "Files found not stored EXPIRY_WARN_DAYS after their task began (asset.expiring).",
            registry=registry,
        )
        # Every label value known in advance is shown from the start, at 0, so a rate over
        # an outcome never begins with a missing series; the children of the delivery path
        # are looked up once here rather than on each delivery.
        self.delivered = {
            outcome: self.deliveries.labels(outcome.value)
            for outcome in Outcome
            if outcome is not Outcome.refused  # counted by reason, in `refused`
        }
        for reason in REFUSALS:
            self.refused.labels(reason)
        for result in ("answered", "failed"):
            self.polls.labels(result)
        for source in ("poll", "sweep"):
            self.recoveries.labels(source)
        for outcome in ("stored", "retry", "failed"):
            self.downloads.labels(outcome)
            self.download_seconds.labels(outcome)
        for outcome in EVENT_OUTCOMES:
            self.events.labels(outcome)


class _Gauges(Collector):
    """The gauges of one scrape, computed before it: a collector's collect() cannot await."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


async def scrape(
    metrics: Metrics,
    ledger: Ledger,
    storage_ready: bool | None,
    ledger_wait: float = BACKLOG_TIMEOUT,
) -> bytes:
    """The Prometheus text of this process's counters and of the gauges read now.

    `storage_ready` is None when this process runs no downloads, so has no storage to
    report. A ledger that does not answer within `ledger_wait` seconds leaves its gauges out, and
    `ledger_up` says so.
    """
    families: list[Metric] = []
    try:
        async with asyncio.timeout(ledger_wait):
            backlog: Backlog | None = await ledger.backlog()
    except (LedgerUnavailable, TimeoutError) as exc:
        log.error("metrics without the ledger's gauges", extra={"error": str(exc) or "timeout"})
        backlog = None
    up = GaugeMetricFamily(f"{PREFIX}_ledger_up", "1 if the last scrape read the ledger.")
    up.add_metric([], 1.0 if backlog is not None else 0.0)
    families.append(up)
    if backlog is not None:
        families += list(_backlog_families(backlog, time.time()))
    if storage_ready is not None:
        families.append(
            _gauge(
                "storage_ready", "1 if this process's downloads have a place to go.", storage_ready
            )
        )
    gauges = CollectorRegistry()
    gauges.register(_Gauges(families))
    return generate_latest(metrics.registry) + generate_latest(gauges)


def _backlog_families(backlog: Backlog, now: float) -> Iterator[Metric]:
    tasks = GaugeMetricFamily(
        f"{PREFIX}_unfinished_tasks",
        "Tasks Kling has not said have ended, by their last status.",
        labels=["status"],
    )
    for status, count in sorted(backlog.tasks.items()):
        tasks.add_metric([status], count)
    yield tasks
    assets = GaugeMetricFamily(
        f"{PREFIX}_queued_assets",
        "Files not stored yet, by state (pending, downloading, failed).",
        labels=["state"],
    )
    for state, count in backlog.assets.items():
        assets.add_metric([state.value], count)
    yield assets
    # An age with nothing to age is 0, so a "too old" alert clears once the work is done.
    yield _gauge(
        "oldest_unfinished_task_age_seconds",
        "Age of the oldest unfinished task (0 when there is none).",
        _age(backlog.oldest_task_at, now),
    )
    yield _gauge(
        "oldest_pending_asset_age_seconds",
        "How long the longest-queued file has waited to be stored (0 when none waits).",
        _age(backlog.oldest_pending_at, now),
    )
    yield _gauge(
        "undelivered_events",
        "Deliveries of outbound events still to be sent, to endpoints in use.",
        backlog.undelivered_events,
    )
    yield _gauge(
        "oldest_undelivered_event_age_seconds",
        "Age of the oldest outbound event not delivered yet (0 when none waits).",
        _age(backlog.oldest_undelivered_at, now),
    )
    if backlog.expires_at is not None:
        yield _gauge(
            "asset_expiry_seconds",
            "Seconds until Kling deletes the first file not stored yet (negative once past).",
            backlog.expires_at - now,
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _age(since: str | None, now: float) -> float:
    return 0.0 if since is None else max(0.0, now - parse_time(since).timestamp())
