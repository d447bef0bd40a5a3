"""The fallback: query tasks whose callbacks went quiet, and confirm held succeed callbacks.

Polling is a safety net, never the main path: a task is first queried only
after its action's typical generation time has passed with no news (so a task
whose callbacks arrive costs no query), then again at growing intervals until
it ends or a give-up horizon passes. Results go through the ledger's one path
with `source = poll`. The poller also reconciles submissions whose process died
before Kling answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from receiver._clock import parse_time, utc_now, wait_for_event
from receiver.kling import KlingAPIError, KlingClient, KlingError
from receiver.ledger import Ledger, Outcome, PollJob, Submission, Update
from receiver.metrics import Metrics
from receiver.models import CallbackRef, PayloadError, Source, Standard
from receiver.settings import Settings
from receiver.shapes import parse_task

__all__ = ["Poller", "poll_after", "update_from_reply"]

log = logging.getLogger("receiver.poller")

# A little over the typical generation times seen by an open-source client (KLING_API.md).
TYPICAL_SECONDS = {
    "images/generations": 30,
    "images/kolors-virtual-try-on": 20,
    "videos/image2video": 180,
    "videos/text2video": 300,
    "videos/video-extend": 300,
    "videos/lip-sync": 480,
}
_UNKNOWN_ACTION_SECONDS = 300
_MARGIN = 1.5
_HOLD_SECONDS = 120.0  # a claimed poll is not claimed again by another poller for this long


def poll_after(settings: Settings, action: str | None) -> float:
    """Seconds of silence before a task is first queried: POLL_AFTER, else per action."""
    if settings.poll_after is not None:
        return settings.poll_after
    return TYPICAL_SECONDS.get(action or "", _UNKNOWN_ACTION_SECONDS) * _MARGIN


def update_from_reply(
    data: dict[str, Any],
    source: Source,
    action: str | None,
    *,
    archive_watermarked: bool,
    ref: CallbackRef | None = None,
    poll_after: float | None = None,
) -> Update:
    """An update from a task object in an API answer, kept as the JSON bytes of that object."""
    return Update(
        archive_watermarked=archive_watermarked,
        task=parse_task(data),
        body=json.dumps(data, separators=(",", ":"), sort_keys=True).encode(),
        source=source,
        received_at=utc_now(),
        ref=ref,
        action=action,
        poll_after=poll_after,
    )


@dataclass
class Poller:
    """Queries due tasks a claim at a time; wake() after holding a succeed to confirm it.

    Old-standard tasks are queried one request each; current-standard ones together, up to
    50 ids a request, so a claim of quiet tasks costs about a fiftieth of a query each.
    """

    ledger: Ledger
    client: KlingClient
    settings: Settings
    batch: int = 200
    on_files: Callable[[], None] | None = None  # told when an answer queued downloads
    metrics: Metrics = field(default_factory=Metrics)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Check every unfinished task once, then poll what falls due, until cancelled."""
        in_flight = await self.ledger.poll_everything_in_flight()
        log.info("poller started", extra={"in_flight": in_flight})
        while True:
            try:
                await self.reconcile()
                jobs = await self.ledger.claim_polls(self.batch, _HOLD_SECONDS)
                await self.poll_all(jobs)
            except Exception:  # the edge of the loop: log, then carry on next tick
                log.exception("polling round failed")
                jobs = []
            if not jobs:
                self._wake.clear()
                await wait_for_event(self._wake, self.settings.poll_tick_seconds)

    def interval(self, quiet_polls: int) -> float:
        """The wait before the next query, growing while queries bring nothing new."""
        grown = self.settings.poll_interval * 2.0 ** min(quiet_polls, 30)
        return min(self.settings.poll_max_interval, grown)

    async def poll_all(self, jobs: list[PollJob]) -> None:
        """Query claimed tasks: the current standard's in batches, the old one's one by one."""
        batched = []
        for job in jobs:
            if await self._given_up(job):
                continue
            if Standard.of(job.action) is Standard.new:
                batched.append(job)
            else:
                await self.poll(job)
        if batched:
            await self._poll_batch(batched)

    async def poll(self, job: PollJob) -> None:
        """Query one task and apply what Kling says of it."""
        if await self._given_up(job):
            return
        try:
            reply = await self.client.query(job.action, job.task_id)
        except (KlingError, ValueError) as exc:
            await self._failed(job, exc)
            return
        await self._apply(job, reply.data)

    async def _poll_batch(self, jobs: list[PollJob]) -> None:
        try:
            found = await self.client.query_batch(task_ids=[job.task_id for job in jobs])
        except (KlingError, ValueError) as exc:
            for job in jobs:
                await self._failed(job, exc)
            return
        by_id = {str(data.get("id", data.get("task_id"))): data for data in found}
        for job in jobs:
            data = by_id.get(job.task_id)
            if data is None:
                missing = KlingAPIError(1203, "the batch query does not list this task", None, 404)
                await self._failed(job, missing)
            else:
                await self._apply(job, data)

    async def _given_up(self, job: PollJob) -> bool:
        """Stop polling a task that has said nothing final for POLL_GIVE_UP_HOURS."""
        age = (parse_time(utc_now()) - parse_time(job.created_at)).total_seconds()
        if job.verify or age <= self.settings.poll_give_up_hours * 3600:
            return False
        note = (
            f"no end heard after {self.settings.poll_give_up_hours:g} h; polling stopped "
            "(`kling-receiver track` starts it again)"
        )
        await self.ledger.poll_failed(job.task_id, None, note)
        log.warning("gave up polling", extra={"task_id": job.task_id})
        return True

    async def _failed(self, job: PollJob, exc: Exception) -> None:
        failure = f"query failed: {exc}" if isinstance(exc, KlingAPIError) else None
        await self.ledger.poll_failed(job.task_id, self.interval(job.quiet_polls), failure)
        self.metrics.polls.labels("failed").inc()
        log.warning("poll failed", extra={"task_id": job.task_id, "error": str(exc)})

    async def _apply(self, job: PollJob, data: dict[str, Any]) -> None:
        try:
            update = update_from_reply(
                data,
                Source.poll,
                job.action,
                archive_watermarked=self.settings.archive_watermarked,
                poll_after=self.interval(job.quiet_polls + 1),
            )
        except PayloadError as exc:
            await self._failed(job, exc)
            return
        applied = await self.ledger.apply(update)
        self._files_queued(applied.assets_created)
        self.metrics.polls.labels("answered").inc()
        if job.verify:
            self.metrics.verifications.inc()
        elif applied.outcome is Outcome.moved and applied.status and applied.status.terminal:
            self.metrics.recoveries.labels("poll").inc()  # its end came by no callback
        log.info(
            "poll",
            extra={
                "task_id": job.task_id,
                "status": update.task.task_status,
                "outcome": applied.outcome.value,
                "verify": job.verify,
                "source": Source.poll.value,
            },
        )

    async def reconcile(self) -> None:
        """Settle submissions whose process died between recording them and Kling's answer."""
        stale = await self.ledger.claim_stale_submissions(
            self.settings.submit_reconcile_after, _HOLD_SECONDS
        )
        for submission, data in await self._look_up(stale):
            ext = submission.external_task_id
            if data is None:
                reason = "Kling has no task with this external_task_id: it was never submitted"
                await self.ledger.submission_failed(ext, "lost", reason)
                log.warning("submission lost", extra={"external_task_id": ext})
                continue
            update = update_from_reply(
                data,
                Source.submit,
                submission.action,
                archive_watermarked=self.settings.archive_watermarked,
                ref=CallbackRef(f"x-{ext}", submission.action),
                poll_after=poll_after(self.settings, submission.action),
            )
            applied = await self.ledger.apply(update)
            self._files_queued(applied.assets_created)
            log.info("submission reconciled", extra={"external_task_id": ext})

    async def _look_up(
        self, stale: list[Submission]
    ) -> list[tuple[Submission, dict[str, Any] | None]]:
        """Kling's task for each submission it answered about (None: it has no such task).

        Submissions Kling gave no answer about are left out, to be tried next round.
        """
        answers: list[tuple[Submission, dict[str, Any] | None]] = []
        batched = [s for s in stale if Standard.of(s.action) is Standard.new]
        if batched:
            try:
                found = await self.client.query_batch(
                    external_task_ids=[s.external_task_id for s in batched]
                )
            except KlingError:
                found = None
            if found is not None:
                by_ext = {str(data.get("external_id")): data for data in found}
                answers += [(s, by_ext.get(s.external_task_id)) for s in batched]
        for submission in stale:
            if Standard.of(submission.action) is Standard.new:
                continue
            try:
                reply = await self.client.query(submission.action, submission.external_task_id)
            except KlingAPIError as exc:
                if exc.not_found:
                    answers.append((submission, None))
                continue
            except KlingError:
                continue
            answers.append((submission, reply.data))
        return answers

    def _files_queued(self, count: int) -> None:
        if count and self.on_files is not None:
            self.on_files()
