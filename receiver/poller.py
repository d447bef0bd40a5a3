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

from receiver._clock import parse_time, utc_now
from receiver.kling import KlingAPIError, KlingClient, KlingError
from receiver.ledger import Ledger, PollJob, Update
from receiver.models import CallbackRef, PayloadError, Source, parse_task
from receiver.settings import Settings

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
    action: str,
    *,
    ref: CallbackRef | None = None,
    poll_after: float | None = None,
) -> Update:
    """An update from a task object in an API answer, kept as the JSON bytes of that object."""
    return Update(
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
    """Queries due tasks one batch at a time; wake() after holding a succeed to confirm it."""

    ledger: Ledger
    client: KlingClient
    settings: Settings
    batch: int = 16
    on_files: Callable[[], None] | None = None  # told when an answer queued downloads
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
                for job in jobs:
                    await self.poll(job)
            except Exception:  # the edge of the loop: log, then carry on next tick
                log.exception("polling round failed")
                jobs = []
            if not jobs:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_tick_seconds)
                except TimeoutError:
                    pass

    def interval(self, quiet_polls: int) -> float:
        """The wait before the next query, growing while queries bring nothing new."""
        grown = self.settings.poll_interval * 2.0 ** min(quiet_polls, 30)
        return min(self.settings.poll_max_interval, grown)

    async def poll(self, job: PollJob) -> None:
        """Query one task and apply what Kling says of it."""
        age = (parse_time(utc_now()) - parse_time(job.created_at)).total_seconds()
        if not job.verify and age > self.settings.poll_give_up_hours * 3600:
            note = (
                f"no end heard after {self.settings.poll_give_up_hours:g} h; polling stopped "
                "(`kling-receiver track` starts it again)"
            )
            await self.ledger.poll_failed(job.task_id, None, note)
            log.warning("gave up polling", extra={"task_id": job.task_id})
            return
        retry_in = self.interval(job.quiet_polls)
        try:
            reply = await self.client.query(job.action, job.task_id)
            update = update_from_reply(
                reply.data, Source.poll, job.action, poll_after=self.interval(job.quiet_polls + 1)
            )
        except (KlingError, PayloadError, ValueError) as exc:
            failure = f"query failed: {exc}" if isinstance(exc, KlingAPIError) else None
            await self.ledger.poll_failed(job.task_id, retry_in, failure)
            log.warning("poll failed", extra={"task_id": job.task_id, "error": str(exc)})
            return
        applied = await self.ledger.apply(update)
        self._files_queued(applied.assets_created)
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
        for stale in await self.ledger.stale_submissions(self.settings.submit_reconcile_after):
            ext = stale.external_task_id
            try:
                reply = await self.client.query(stale.action, ext)
            except KlingAPIError as exc:
                if exc.not_found:
                    reason = "Kling has no task with this external_task_id: it was never submitted"
                    await self.ledger.submission_failed(ext, "lost", reason)
                    log.warning("submission lost", extra={"external_task_id": ext})
                continue
            except KlingError:
                continue
            ref = CallbackRef(f"x-{ext}", stale.action)
            update = update_from_reply(
                reply.data,
                Source.submit,
                stale.action,
                ref=ref,
                poll_after=poll_after(self.settings, stale.action),
            )
            applied = await self.ledger.apply(update)
            self._files_queued(applied.assets_created)
            log.info("submission reconciled", extra={"external_task_id": ext})

    def _files_queued(self, count: int) -> None:
        if count and self.on_files is not None:
            self.on_files()
