"""Download workers: claim an asset job with a lease, fetch it into the sink, record the outcome.

A job is leased, never locked in memory: the lease is renewed while the
download runs, and a worker that dies leaves a lease that expires, after
which any worker (in this process or another) takes the job over and resumes
from the bytes already on disk.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from receiver._clock import parse_time, utc_in, utc_now, wait_for_event
from receiver.ledger import AssetJob, AssetQueue, AssetResult, LedgerUnavailable, lease_owner
from receiver.metrics import Metrics
from receiver.models import AssetKind, AssetState
from receiver.samples import SAMPLES_PATH
from receiver.settings import Settings
from storage import (
    Fetched,
    FetchError,
    Limits,
    NotMedia,
    S3Options,
    Sink,
    SinkError,
    StorageError,
    TooLarge,
    UrlPolicy,
    extension,
    fetch,
    open_sink,
)

__all__ = ["Downloader", "RetryPolicy", "asset_stem", "downloader_for", "sink_for"]

log = logging.getLogger("receiver.workers")

_NOT_YET = {403, 404, 410}
# How an attempt's result is counted in /metrics: a pending result is a retry to come.
_OUTCOMES = {
    AssetState.stored: "stored",
    AssetState.pending: "retry",
    AssetState.failed: "failed",
    AssetState.downloading: "retry",  # never a result; listed so every state has a name
}


def asset_stem(
    action: str | None, task_id: str, kind: AssetKind, index: int, variant: str = ""
) -> str:
    """The storage key without its extension: `videos/text2video/<task_id>/0`.

    The index alone names the file when the kind is the one the action makes
    (videos/… make videos); otherwise the kind prefixes it (`image-0`). A variant
    follows (`0-watermarked`, `audio-0-mp3`), so each file of an output has a key.
    """
    family = action.split("/")[0] if action else None
    name = str(index) if family == f"{kind.value}s" else f"{kind.value}-{index}"
    if variant:
        name += f"-{variant}"
    return f"{action or 'unknown-action'}/{task_id}/{name}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try a failed download again, and when to give up.

    A wait (backoff or Retry-After, which fetch caps at an hour) never runs past the
    horizon: the last try comes at its end, and a failure after it is final.
    """

    base_delay: float = 2.0
    max_delay: float = 600.0
    horizon: float = 24 * 3600.0  # keep trying transient failures this long
    not_found_tries: int = 5  # 403/404/410: the CDN may lag, but not forever

    def delay(self, error: StorageError, attempts: int, first_seen: datetime) -> float | None:
        """Seconds until the next try, or None to give up."""
        if not error.retry:
            return None
        fetch_error = error if isinstance(error, FetchError) else None
        status = fetch_error.status if fetch_error else None
        if status in _NOT_YET and attempts >= self.not_found_tries:
            return None
        left = self.horizon - (datetime.now(UTC) - first_seen).total_seconds()
        if left < 0:
            return None
        backoff: float = min(self.max_delay, self.base_delay * 2.0 ** max(0, attempts - 1))
        backoff *= random.uniform(0.5, 1.0)  # jitter, so a burst of failures spreads out
        retry_after = fetch_error.retry_after if fetch_error else None
        return min(max(backoff, retry_after or 0.0), left)


@dataclass
class Downloader:
    """A pool of download workers sharing one ledger and one sink."""

    ledger: AssetQueue
    sink: Sink
    policy: UrlPolicy
    limits: Limits = field(default_factory=Limits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency: int = 4
    lease_seconds: float = 30.0
    idle_seconds: float = 1.0
    recheck_seconds: float = 15.0
    settle_retry_seconds: float = 0.25  # first wait before recording an outcome again
    owner: str = field(default_factory=lease_owner)
    metrics: Metrics = field(default_factory=Metrics)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _storage_problem: str | None = "the storage has not been checked yet"
    _storage_ok: asyncio.Event = field(default_factory=asyncio.Event)
    _storage_doubt: asyncio.Event = field(default_factory=asyncio.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _threads: ThreadPoolExecutor | None = None

    @property
    def storage_problem(self) -> str | None:
        """Why no file can be stored now (credentials, bucket, disk); None when all is well."""
        return self._storage_problem

    def wake(self) -> None:
        """New jobs were queued: look now rather than at the next idle tick."""
        self._wake.set()

    async def run(self) -> None:
        """Run the workers until cancelled; they claim nothing while the sink cannot store."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._watch_storage(), name="storage-check")
                for number in range(self.concurrency):
                    group.create_task(self._work(number), name=f"download-worker-{number}")
        finally:
            threads, self._threads = self._threads, None
            if threads is not None:
                # Cancelled downloads stop at their next read; the loop does not wait for them.
                threads.shutdown(wait=False)

    async def _watch_storage(self) -> None:
        """Check the sink at start, and again whenever a download finds it unavailable.

        While it is unavailable the workers wait (assets stay queued, their attempts
        unspent) and it is checked every `recheck_seconds` until it takes files again.
        """
        while True:
            problem = await asyncio.to_thread(self._check_sink)
            if problem != self._storage_problem:
                if problem is None:
                    log.info("storage ready")
                else:
                    log.warning("storage unavailable; downloads wait", extra={"reason": problem})
            self._storage_problem = problem
            if problem is None:
                self._storage_ok.set()
                await self._storage_doubt.wait()
                self._storage_doubt.clear()
            else:
                self._storage_ok.clear()
                await asyncio.sleep(self.recheck_seconds)

    def _check_sink(self) -> str | None:
        try:
            return self.sink.check()
        except Exception as exc:  # a check that breaks says so, and is tried again
            log.exception("cannot check the storage")
            return f"the storage check failed: {exc!r}"

    async def _work(self, number: int) -> None:
        while True:
            await self._storage_ok.wait()
            try:
                job = await self.ledger.claim_asset(self.owner, self.lease_seconds)
            except Exception:
                log.exception("cannot claim a job", extra={"worker": number})
                job = None
            if job is None:
                self._wake.clear()
                await wait_for_event(self._wake, self.idle_seconds)
                continue
            await self.process(job)

    async def process(self, job: AssetJob) -> None:
        """Download one claimed job and record what happened; never raises but cancellation."""
        cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        renewer = asyncio.create_task(self._renew(job, cancel))
        started = time.perf_counter()
        try:
            result = await self._loop.run_in_executor(
                self._download_threads(), self._download, job, cancel
            )
        except asyncio.CancelledError:
            cancel.set()
            # Once: a shutdown does not wait for a database that is away.
            await self._settle(
                job, AssetResult(AssetState.pending, count_attempt=False), patient=False
            )
            raise
        except Exception as exc:  # the edge of a worker: log it, retry it, keep working
            log.exception("download crashed", extra={"task_id": job.task_id, "asset": job.asset_id})
            result = self._crashed(job, exc)
        finally:
            renewer.cancel()
        if cancel.is_set() and result.state is not AssetState.stored:
            return  # the lease was lost: another worker owns the job now
        await self._settle(job, result)
        seconds = time.perf_counter() - started
        outcome = _OUTCOMES[result.state]
        self.metrics.downloads.labels(outcome).inc()
        self.metrics.download_seconds.labels(outcome).observe(seconds)
        if result.state is AssetState.stored and result.size:
            self.metrics.downloaded_bytes.inc(result.size)
        log.info(
            "download",
            extra={
                "task_id": job.task_id,
                "kind": job.kind.value,
                "index": job.index,
                "variant": job.variant,
                "state": result.state.value,
                "size": result.size,
                "error": result.error,
                "attempt": job.attempts + 1,
                "seconds": round(seconds, 3),
            },
        )

    def _download_threads(self) -> ThreadPoolExecutor:
        """A thread for each worker: the loop's default pool (six threads on two cores) would
        leave jobs claimed beyond it waiting, and other work waiting behind them."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.concurrency, thread_name_prefix="download")
        return self._threads

    def _crashed(self, job: AssetJob, exc: Exception) -> AssetResult:
        """The outcome of an attempt that raised: retried, even if deciding when raises too."""
        error = StorageError(job.url, f"internal error: {exc!r}", retry=True)
        try:
            return self._failure(job, error)
        except Exception:
            log.exception("cannot decide when to retry", extra={"task_id": job.task_id})
            # The lease must still be settled, or the job waits for it to lapse.
            note = f"{error.reason} (will try again)"
            return AssetResult(
                AssetState.pending, error=note, retry_at=utc_in(self.retry.max_delay)
            )

    def _download(self, job: AssetJob, cancel: threading.Event) -> AssetResult:
        stem = asset_stem(job.action, job.task_id, job.kind, job.index, job.variant)
        try:
            writer = self.sink.open(stem)
        except StorageError as exc:  # an unsafe key, or a disk that refuses: the sink says which
            return self._failure(job, exc)
        keep = True  # whether the held bytes stay for the next attempt to resume from
        try:
            fetched = fetch(
                job.url,
                writer,
                policy=self.policy,
                limits=self.limits,
                cancel=cancel,
                expect=job.kind.value,
            )
            key = stem + extension(fetched.content_type, fetched.final_url)
            stored_at = utc_now()
            location = writer.commit(key, _sidecar(job, fetched, stored_at))
        except StorageError as exc:
            result = self._failure(job, exc)
            keep = result.state is not AssetState.failed and not isinstance(
                exc, TooLarge | NotMedia
            )
            return result
        finally:
            # Whatever stopped the attempt, its file and lock are let go.
            if keep:
                writer.close()
            else:
                writer.discard()
        note = None
        if job.expected_sha256 and job.expected_sha256 != fetched.sha256:
            note = f"re-fetched bytes differ from the sha256 stored before ({job.expected_sha256})"
        return AssetResult(
            AssetState.stored,
            error=note,
            location=location,
            sha256=fetched.sha256,
            size=fetched.size,
            content_type=fetched.content_type,
            stored_at=stored_at,
        )

    def _failure(self, job: AssetJob, error: StorageError) -> AssetResult:
        if isinstance(error, SinkError) and error.unavailable and self._loop is not None:
            self._loop.call_soon_threadsafe(self._storage_doubt.set)  # have the sink checked
        delay = self.retry.delay(error, job.attempts + 1, parse_time(job.created_at))
        if delay is None and job.expected_sha256 is not None:
            # A forced re-check that cannot fetch (the CDN expired it) keeps the stored copy.
            return AssetResult(AssetState.stored, error=f"re-check failed: {error.reason}")
        if delay is None:
            return AssetResult(AssetState.failed, error=error.reason)
        return AssetResult(
            AssetState.pending, error=f"{error.reason} (will try again)", retry_at=utc_in(delay)
        )

    async def _renew(self, job: AssetJob, cancel: threading.Event) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                kept = await self.ledger.renew_lease(job.asset_id, self.owner, self.lease_seconds)
            except Exception:
                log.exception("cannot renew a lease", extra={"task_id": job.task_id})
                continue
            if not kept:
                log.warning("lease lost", extra={"task_id": job.task_id, "asset": job.asset_id})
                cancel.set()
                return

    async def _settle(self, job: AssetJob, result: AssetResult, *, patient: bool = True) -> None:
        """Record the outcome; while the ledger is unavailable, try again until it answers.

        Given up, the job would wait for its lease to lapse and then be fetched again from
        the start, though its file is stored. Retried, it is recorded as soon as the
        database is back, before any other worker can take the job over, unless the outage
        outlasted the lease.
        """
        wait, refused = self.settle_retry_seconds, False
        while True:
            try:
                await self.ledger.settle_asset(job.asset_id, self.owner, result)
            except LedgerUnavailable:
                if not patient:
                    log.exception("cannot record a download", extra={"task_id": job.task_id})
                    return
                if not refused:
                    log.exception(
                        "cannot record a download; trying again", extra={"task_id": job.task_id}
                    )
                refused = True
                await asyncio.sleep(wait)
                wait = min(wait * 2, 1.0)  # soon after the database is back
                continue
            except Exception:
                # The lease runs out and the job is taken again; the stored file is reused by key.
                log.exception("cannot record a download", extra={"task_id": job.task_id})
                return
            if refused:
                log.info(
                    "download recorded once the ledger answered", extra={"task_id": job.task_id}
                )
            return


def _sidecar(job: AssetJob, fetched: Fetched, stored_at: str) -> dict[str, object]:
    """What a file's JSON sidecar says, so the archive stays meaningful without the database."""
    return {
        "task_id": job.task_id,
        "action": job.action,
        "kind": job.kind.value,
        "index": job.index,
        "variant": job.variant,
        "group_id": job.group_id,
        "source_url": job.url,
        "final_url": fetched.final_url,
        "sha256": fetched.sha256,
        "size": fetched.size,
        "content_type": fetched.content_type,
        "stored_at": stored_at,
        "task": job.task_params,
    }


def sink_for(settings: Settings) -> Sink:
    """The sink that STORAGE_URL (and, for a bucket, S3_* and AWS_*) describe."""
    s3 = None
    if settings.aws_access_key_id and settings.aws_secret_access_key:
        token = settings.aws_session_token
        s3 = S3Options(
            access_key_id=settings.aws_access_key_id,
            secret_access_key=settings.aws_secret_access_key.get_secret_value(),
            session_token=token.get_secret_value() if token else None,
            region=settings.aws_region_name,
            endpoint_url=settings.s3_endpoint_url or None,
            path_style=settings.s3_path_style,
            allow_http=settings.s3_allow_http,
            part_size=settings.s3_part_size,
            upload_concurrency=settings.s3_upload_concurrency,
        )
    return open_sink(settings.storage_url, s3)


def downloader_for(
    settings: Settings,
    ledger: AssetQueue,
    concurrency: int | None = None,
    sink: Sink | None = None,
    metrics: Metrics | None = None,
) -> Downloader:
    """The worker pool that DOWNLOAD_* and STORAGE_URL describe."""
    return Downloader(
        ledger=ledger,
        sink=sink or sink_for(settings),
        policy=UrlPolicy(
            settings.allow_private_downloads,
            settings.allowed_hosts,
            own_samples=settings.public_url + SAMPLES_PATH,
        ),
        limits=Limits(
            max_bytes=settings.max_asset_bytes,
            read_timeout=settings.download_read_timeout,
            min_rate=settings.download_min_rate,
            rate_window=settings.download_rate_window,
        ),
        retry=RetryPolicy(
            base_delay=settings.download_retry_base_seconds,
            horizon=settings.download_retry_hours * 3600,
            not_found_tries=settings.download_not_found_tries,
        ),
        concurrency=settings.download_concurrency if concurrency is None else concurrency,
        lease_seconds=settings.download_lease_seconds,
        recheck_seconds=settings.storage_check_seconds,
        metrics=metrics or Metrics(),
    )
