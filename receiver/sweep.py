"""The account sweep: list the account's succeeded tasks and adopt the ones nobody told us of.

Callbacks can be lost before the service ever ran, and tasks may be submitted by
other tools; the sweep finds their files before Kling deletes them. It pages
through `POST /tasks` (the current standard's listing, by creation time) over a
window that starts where the last sweep ended, less `OVERLAP`: a task listed
before it had finished is listed again once it has. Where the window ends is
kept in the ledger only after a sweep finished, so a restart neither skips a
span nor starts over. Old-standard tasks are not in this listing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from receiver.kling import LIST_LIMIT, KlingClient, KlingError
from receiver.ledger import Ledger, Outcome, lease_owner
from receiver.metrics import Metrics
from receiver.models import PayloadError, Source
from receiver.poller import update_from_reply
from receiver.settings import Settings

__all__ = ["MARK", "OVERLAP_MS", "TURN", "Sweeper", "Tally", "sweep"]

log = logging.getLogger("receiver.sweep")

MARK = "sweep.listed_until"  # ms since 1970: the end of the last finished sweep's window
TURN = "sweep"  # the fleet-wide turn: one process sweeps, whatever the number of processes
# Listing is by creation time and generation takes minutes, rarely hours: six hours of
# overlap lists again every task that was still running when the last window closed.
OVERLAP_MS = 6 * 3600 * 1000
_MAX_PAGES = 10_000  # a listing that never ends (a cursor that loops) is cut off here


@dataclass
class Tally:
    """What a sweep saw: tasks listed, adopted (unknown before), known already, unreadable."""

    seen: int = 0
    adopted: int = 0
    known: int = 0
    unreadable: int = 0
    pages: int = 0
    total: int | None = None  # as the listing counts the window's tasks, when it says

    def as_json(self) -> dict[str, int | None]:
        return {
            "seen": self.seen,
            "adopted": self.adopted,
            "known": self.known,
            "unreadable": self.unreadable,
            "pages": self.pages,
        }


def now_ms() -> int:
    return int(time.time() * 1000)


async def sweep(
    ledger: Ledger,
    client: KlingClient,
    settings: Settings,
    start_ms: int,
    end_ms: int,
    *,
    progress: Callable[[Tally], None] | None = None,
    on_files: Callable[[], None] | None = None,
    page_limit: int = LIST_LIMIT,
    metrics: Metrics | None = None,
) -> Tally:
    """Adopt every succeeded task created in [start_ms, end_ms] that the ledger does not know.

    A task the ledger knows but has not seen finish is brought up to date as well (and
    counted as known). Raises `KlingError` if the listing fails part way.
    """
    tally = Tally()
    cursor = ""
    cursors = {cursor}
    while tally.pages < _MAX_PAGES:
        page = await client.list_tasks(start_ms, end_ms, cursor=cursor, limit=page_limit)
        tally.pages += 1
        tally.total = page.count
        for data in page.tasks:
            tally.seen += 1
            await _adopt(ledger, settings, data, tally, on_files, metrics)
        if progress is not None:
            progress(tally)
        if not page.next_cursor or not page.tasks or page.next_cursor in cursors:
            break
        cursor = page.next_cursor
        cursors.add(cursor)
    return tally


async def _adopt(
    ledger: Ledger,
    settings: Settings,
    data: dict[str, object],
    tally: Tally,
    on_files: Callable[[], None] | None,
    metrics: Metrics | None,
) -> None:
    try:
        update = update_from_reply(
            data, Source.sweep, None, archive_watermarked=settings.archive_watermarked
        )
    except PayloadError as exc:
        tally.unreadable += 1
        log.warning("sweep skipped a task it cannot read", extra={"error": str(exc)})
        return
    known = await ledger.task(update.task.task_id)
    if known is not None:
        tally.known += 1
        if known.status is not None and known.status.terminal:
            return  # nothing the listing can add
    else:
        tally.adopted += 1
    applied = await ledger.apply(update)
    if applied.assets_created and on_files is not None:
        on_files()
    ended = applied.outcome is Outcome.moved and applied.status and applied.status.terminal
    if ended and metrics is not None:
        metrics.recoveries.labels("sweep").inc()
    if known is None:
        log.info(
            "adopted by sweep",
            extra={"task_id": update.task.task_id, "assets_created": applied.assets_created},
        )


@dataclass
class Sweeper:
    """Sweeps every SWEEP_INTERVAL seconds, each time from where the last sweep ended."""

    ledger: Ledger
    client: KlingClient
    settings: Settings
    on_files: Callable[[], None] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    owner: str = field(default_factory=lease_owner)
    _clock: Callable[[], int] = field(default=now_ms)

    async def run(self) -> None:
        """Sweep every SWEEP_INTERVAL while this process holds the fleet's sweep turn."""
        while True:
            try:
                await self.turn()
            except Exception:  # the edge of the loop: log, then carry on next interval
                log.exception("sweep failed")
            await asyncio.sleep(self.settings.sweep_interval)

    async def turn(self) -> Tally | None:
        """Sweep once if this process holds the turn (taking it when free or lapsed)."""
        # Held for one and a half intervals: the holder renews it each time, and another
        # process takes over half an interval after the holder stops.
        hold = self.settings.sweep_interval * 1.5
        if not await self.ledger.take_turn(TURN, self.owner, hold):
            return None
        return await self.once()

    async def once(self) -> Tally | None:
        """One sweep over [last end - OVERLAP_MS, now]; on the very first start, only the mark."""
        end = self._clock()
        mark = await self.ledger.mark(MARK)
        if mark is None:
            await self.ledger.set_mark(MARK, str(end))  # the first sweep starts here
            log.info("sweep window begins", extra={"listed_until": end})
            return None
        start = int(mark) - OVERLAP_MS
        try:
            tally = await sweep(
                self.ledger,
                self.client,
                self.settings,
                start,
                end,
                on_files=self.on_files,
                metrics=self.metrics,
            )
        except KlingError as exc:
            log.warning(
                "sweep failed; the same window is swept next time", extra={"error": str(exc)}
            )
            return None
        await self.ledger.set_mark(MARK, str(end))
        log.info("sweep", extra=tally.as_json() | {"start_ms": start, "end_ms": end})
        return tally
