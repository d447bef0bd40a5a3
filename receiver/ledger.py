"""The ledger: durable tasks, their deliveries and their assets, and the rules that move them.

The rules are plain functions, here and in `receiver.rules` (which decides what
`apply` does), so every database backend applies them the same way; a backend
(`receiver._sqlite`, later PostgreSQL) only reads, stores and locks;
`receiver.database` opens the one DATABASE_URL names.

Exceptions::

    LedgerError
    └── LedgerUnavailable   the database cannot be opened or does not answer
"""

from __future__ import annotations

import enum
import hashlib
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from receiver._clock import parse_time
from receiver.models import (
    AssetKind,
    AssetRecord,
    AssetState,
    CallbackRef,
    EventRecord,
    KlingTask,
    Source,
    TaskRecord,
    TaskStatus,
)

__all__ = [
    "KLING_KEEPS_SECONDS",
    "PROBLEM_STATES",
    "UNFINISHED_STATUSES",
    "UNSTORED_STATES",
    "Activity",
    "Applied",
    "AssetJob",
    "AssetProblem",
    "AssetQueue",
    "AssetResult",
    "Backlog",
    "DeliveryAttempt",
    "DeliveryLog",
    "EndpointHealth",
    "EventDelivery",
    "EventOutbox",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "OutboundEvent",
    "Outcome",
    "PollJob",
    "ProblemPage",
    "StateKey",
    "Submission",
    "TaskPage",
    "Update",
    "backlog",
    "binding_conflict",
    "contradiction",
    "endpoint_health",
    "lease_owner",
    "moves_forward",
    "yields_to",
]


class LedgerError(Exception):
    """Root of the ledger's errors."""


class LedgerUnavailable(LedgerError):
    """The database cannot be opened or does not answer."""


class Outcome(enum.StrEnum):
    """What applying one delivery did."""

    moved = "moved"  # new delivery; the task's state moved forward
    kept = "kept"  # new delivery, recorded; the state stays (older, lower or unknown status)
    duplicate = "duplicate"  # the same bytes were recorded before; only counted
    refused = "refused"  # the callback URL belongs to another task; nothing recorded
    held = "held"  # recorded; a succeed that waits for Kling's API to confirm it


@dataclass(frozen=True, slots=True)
class Update:
    """One delivery of a task object, from whatever source, with the bytes it came as."""

    task: KlingTask
    body: bytes
    source: Source
    received_at: str
    ref: CallbackRef | None = None
    action: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    remote: str | None = None
    # Seconds until the task is polled if it is still not finished (None: leave the schedule).
    poll_after: float | None = None
    # A succeed must be confirmed by a query before files are queued (VERIFY_CALLBACKS).
    confirm: bool = False
    # Watermarked copies are archived too (ARCHIVE_WATERMARKED).
    archive_watermarked: bool = False

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    @property
    def effective_action(self) -> str | None:
        return self.action or (self.ref.action if self.ref else None)


@dataclass(frozen=True, slots=True)
class Applied:
    """The ledger's answer to an update."""

    outcome: Outcome
    status: TaskStatus | None = None
    assets_created: int = 0
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class AssetJob:
    """An asset claimed for download, with what the worker needs to fetch and describe it."""

    asset_id: int
    task_id: str
    action: str | None
    kind: AssetKind
    index: int
    variant: str
    group_id: str | None
    url: str
    attempts: int  # finished attempts before this one
    created_at: str  # when the asset was queued: the retry horizon counts from here
    expected_sha256: str | None  # set when a stored asset is fetched again to compare
    task_params: dict[str, Any] | None  # the task's prompt and parameters, when known


@dataclass(frozen=True, slots=True)
class AssetResult:
    """How a download attempt ended: stored, queued again (`pending`) or `failed`."""

    state: AssetState
    error: str | None = None
    retry_at: str | None = None
    location: str | None = None
    sha256: str | None = None
    size: int | None = None
    content_type: str | None = None
    stored_at: str | None = None
    count_attempt: bool = True  # False when a worker hands a job back unfinished at shutdown


@dataclass(frozen=True, slots=True)
class PollJob:
    """A task whose callbacks went quiet (or whose succeed awaits confirmation), due a query."""

    task_id: str
    action: str
    quiet_polls: int  # polls in a row that brought nothing new
    verify: bool  # the query confirms a held succeed rather than looking for news
    created_at: str  # when polling began (or `track` began it again): the give-up counts from here


@dataclass(frozen=True, slots=True)
class Submission:
    """A task submitted through the service, from before Kling answers."""

    external_task_id: str
    action: str
    params: dict[str, Any]
    state: str  # pending | accepted | refused | lost
    task_id: str | None
    error: str | None
    created_at: str


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[TaskRecord]
    next_cursor: str | None


# The assets the dashboard's failures page lists: given up on, or still waiting.
PROBLEM_STATES = (AssetState.failed, AssetState.pending, AssetState.downloading)


@dataclass(frozen=True, slots=True)
class AssetProblem:
    """An asset not stored (failed, or waiting), with the task it belongs to."""

    id: int  # the asset's row: the paging cursor
    task_id: str
    action: str | None
    asset: AssetRecord
    updated_at: str


@dataclass(frozen=True, slots=True)
class ProblemPage:
    problems: list[AssetProblem]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """An outbound endpoint as the outbox sees it: in use or not, and what waits for it."""

    url: str
    active: bool
    gone_at: str | None  # when it answered 410 (nothing is sent until a replay names it)
    pending: int
    failed: int


@dataclass(frozen=True, slots=True)
class Activity:
    """What the dashboard's overview counts, from a few indexed aggregates."""

    by_status: dict[str, int]  # every task by status ("unknown" until Kling has said one)
    learned_from: dict[str, int]  # finished tasks by how their end was learned
    per_minute: list[tuple[str, int]]  # ("YYYY-MM-DDTHH:MM", deliveries first received then)
    endpoints: list[EndpointHealth]
    oldest_unfinished: str | None = None  # the task_id of the oldest task not finished


@dataclass(frozen=True, slots=True)
class OutboundEvent:
    """An event in the outbox: its body is signed and sent as it was written, every time."""

    id: int  # its place in the outbox: the stream's event id and the paging cursor
    msg_id: str  # the `webhook-id`, the same for every attempt and replay
    type: str
    task_id: str | None
    created_at: str
    body: bytes


@dataclass(frozen=True, slots=True)
class EventDelivery:
    """One event leased for sending to one endpoint."""

    id: int
    endpoint: str
    attempts: int  # finished attempts before this one
    event: OutboundEvent


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """How one attempt to send an event went, and what becomes of its delivery.

    `state` is `delivered`, `pending` (tried again at `retry_at`), `failed` (the
    schedule ran out) or `gone` (the endpoint answered 410: it and its queue wait
    until someone replays to it).
    """

    state: str
    at: str
    latency_ms: float
    status: int | None = None  # the HTTP status, when one came
    error: str | None = None
    response: str | None = None  # the start of the answer's body
    retry_at: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryLog:
    """An event's deliveries, one per endpoint (and replay), each with its attempts."""

    event: OutboundEvent
    deliveries: list[dict[str, Any]]


# Kling deletes a task's files this long after it created the task.
KLING_KEEPS_SECONDS = 30 * 24 * 3600.0
# What `Ledger.backlog` reads: the statuses of unfinished tasks, the states of unstored assets.
UNFINISHED_STATUSES = ("submitted", "processing")
UNSTORED_STATES = (AssetState.pending, AssetState.downloading, AssetState.failed)


@dataclass(frozen=True, slots=True)
class Backlog:
    """The work still to do, as the ledger holds it: the same whichever process reads it."""

    tasks: dict[str, int]  # unfinished tasks by status ("unknown" until Kling has said one)
    assets: dict[AssetState, int]  # assets not stored yet, by state (each of UNSTORED_STATES)
    oldest_task_at: str | None  # when the oldest unfinished task was first recorded
    oldest_pending_at: str | None  # when the longest-queued pending or downloading asset was
    expires_at: float | None  # epoch seconds when the first unstored asset's file is deleted
    undelivered_events: int = 0  # deliveries of outbound events still to be sent
    oldest_undelivered_at: str | None = None  # when the oldest of them was written


def backlog(
    tasks: list[tuple[str | None, int, str]],
    assets: list[tuple[str, int, str]],
    kling_created_ms: int | None,
    created_at: str | None,
    undelivered: tuple[int, str | None] = (0, None),
) -> Backlog:
    """A Backlog from what each backend's queries return, combined the same way for both.

    `tasks` and `assets` are (status or state, count, oldest created_at) rows; the expiry is
    counted from Kling's creation time, or from when the ledger first heard of the task if
    Kling never said (`created_at`: the oldest such task with an unstored asset).
    `undelivered` is the count of event deliveries still to send and the oldest one's time.
    """
    queued = [oldest for state, _, oldest in assets if state != AssetState.failed]
    starts = []
    if kling_created_ms is not None:
        starts.append(kling_created_ms / 1000)
    if created_at is not None:
        starts.append(parse_time(created_at).timestamp())
    return Backlog(
        tasks={status or "unknown": count for status, count, _ in tasks},
        assets={state: 0 for state in UNSTORED_STATES}
        | {AssetState(state): count for state, count, _ in assets},
        oldest_task_at=min((oldest for _, _, oldest in tasks), default=None),
        oldest_pending_at=min(queued, default=None),
        expires_at=min(starts) + KLING_KEEPS_SECONDS if starts else None,
        undelivered_events=undelivered[0],
        oldest_undelivered_at=undelivered[1],
    )


def endpoint_health(
    endpoints: list[tuple[Any, ...]], waiting: list[tuple[Any, ...]]
) -> list[EndpointHealth]:
    """Each (url, active, gone_at) endpoint with its deliveries from the (endpoint, state,
    count) rows of those pending or failed: combined the same way for both backends."""
    counts = {(endpoint, state): int(count) for endpoint, state, count in waiting}
    return [
        EndpointHealth(
            url=url,
            active=bool(active),
            gone_at=gone_at,
            pending=counts.get((url, "pending"), 0),
            failed=counts.get((url, "failed"), 0),
        )
        for url, active, gone_at in endpoints
    ]


@dataclass(frozen=True, slots=True)
class StateKey:
    """What orders deliveries: status rank, then Kling's updated_at, then the body's digest."""

    status: TaskStatus | None
    kling_updated_at: int | None
    digest: str


def moves_forward(current: StateKey | None, incoming: StateKey) -> bool:
    """Whether `incoming` replaces `current`; any order of deliveries ends the same.

    Unknown statuses never move a task; terminal states are final; among
    non-terminal deliveries the higher rank wins, then the later `updated_at`, then
    (so that duplicates with equal times still agree) the larger body digest.
    """
    if incoming.status is None:
        return False
    if current is None or current.status is None:
        return True
    if current.status.terminal:
        return False

    def order(key: StateKey) -> tuple[int, int, str]:
        assert key.status is not None
        return (
            key.status.rank,
            -1 if key.kling_updated_at is None else key.kling_updated_at,
            key.digest,
        )

    return order(incoming) > order(current)


@dataclass(frozen=True, slots=True)
class Binding:
    """What the ledger knows of a task's identity, for the credential check."""

    task_id: str | None
    external_task_id: str | None
    callback_ref: str | None


def contradiction(claimed: KlingTask, confirmed: KlingTask) -> str | None:
    """How a succeed callback disagrees with what Kling's API says of the task, if it does."""
    if confirmed.status is not TaskStatus.succeed:
        return f"a callback said succeed, but Kling's API says {confirmed.task_status}"
    if sorted(a.url for a in claimed.assets()) != sorted(a.url for a in confirmed.assets()):
        return "a callback named other files than Kling's API; the API's were used"
    return None


def yields_to(ref: CallbackRef | None, binding: Binding | None) -> bool:
    """Whether a delivery through `ref` takes over a task (or its external_task_id) so bound.

    A hand-made `h-` URL may be shared by many tasks and anyone holding it can name
    any task, so the binding it makes is provisional: a task's own `x-` URL (or the
    service's own submission, which sends that URL) outranks it. Nothing outranks
    an `x-` binding.
    """
    return (
        ref is not None
        and ref.external_task_id is not None
        and binding is not None
        and binding.callback_ref is not None
        and binding.callback_ref.startswith("h-")
    )


def binding_conflict(
    ref: CallbackRef | None, task: KlingTask, by_task_id: Binding | None, by_ref: Binding | None
) -> str | None:
    """Why a delivery through `ref` may not speak for `task`, or None when it may.

    A URL made for one task speaks only for that task; a task bound to one URL
    accepts callbacks through that URL only, unless the binding `yields_to` this
    one. Updates not from a callback URL (polls) are never refused here.
    """
    if ref is None:
        return None
    # What a hand-made URL bound gives way to the task's own URL, so it is not checked.
    if yields_to(ref, by_task_id):
        by_task_id = None
    if yields_to(ref, by_ref):
        by_ref = None
    if by_task_id is not None and by_task_id.callback_ref not in (None, ref.ref):
        return "this task reports to another callback URL"
    expected = ref.external_task_id
    if expected is None:
        return None
    if task.external_task_id not in (None, expected):
        return "this callback URL was made for another task (external_task_id differs)"
    if by_ref is not None and by_ref.task_id not in (None, task.task_id):
        return "this callback URL belongs to another task"
    if by_task_id is not None and by_task_id.external_task_id not in (None, expected):
        return "this task was submitted under another external_task_id"
    return None


def lease_owner() -> str:
    """A name for this process's leases and turns, unique across machines and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class AssetQueue(Protocol):
    """The part of the ledger download workers need: leased jobs, and their outcomes."""

    async def claim_asset(self, owner: str, lease_seconds: float) -> AssetJob | None:
        """Lease the next asset due for download (or one whose lease ran out), if any."""
        ...

    async def renew_lease(self, asset_id: int, owner: str, lease_seconds: float) -> bool:
        """Extend `owner`'s lease; False when the lease was lost to another worker."""
        ...

    async def settle_asset(self, asset_id: int, owner: str, result: AssetResult) -> bool:
        """Record an attempt's outcome and archive the task once every asset is stored.

        False (and nothing recorded) when `owner` no longer holds the lease.
        """
        ...


class EventOutbox(Protocol):
    """The outbox of signed events: written with the changes that cause them, sent by leases.

    Every ledger change that publishes an event (`receiver.events`) writes it in the same
    transaction, with one delivery for each endpoint `set_endpoints` named; dispatchers
    lease deliveries, at most one at a time for each task and endpoint, oldest first.
    """

    async def set_endpoints(self, urls: list[str]) -> None:
        """The endpoints events go to from now on; deliveries to dropped ones stay untouched."""
        ...

    async def claim_deliveries(
        self, owner: str, lease_seconds: float, limit: int
    ) -> list[EventDelivery]:
        """Lease deliveries that are due, each the oldest unsent one of its task and endpoint."""
        ...

    async def settle_delivery(self, delivery_id: int, owner: str, attempt: DeliveryAttempt) -> bool:
        """Log an attempt and move its delivery on; False (nothing logged) without the lease."""
        ...

    async def outbound_events(
        self,
        *,
        after: int | None = None,
        before: int | None = None,
        type: str | None = None,
        task_id: str | None = None,
        limit: int = 50,
    ) -> list[OutboundEvent]:
        """Events oldest first after `after`, else newest first below `before` (a page)."""
        ...

    async def delivery_log(self, msg_id: str) -> DeliveryLog | None:
        """An event with its deliveries and their attempts; None for an unknown event."""
        ...

    async def replay(
        self,
        since: str,
        types: list[str],
        endpoint: str | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Send again events written since `since` (of `types`, when given) to `endpoint` (or
        every endpoint): new deliveries, same `webhook-id`. Those of these events still
        waiting for a retry are due now too (their copies go after them). Replaying to an
        endpoint that answered 410 takes it back. Returns the deliveries queued.

        Long replays go a span of the outbox at a time: `progress(done, total)` hears of each.
        """
        ...

    async def warn_expiring(self, created_before: float, limit: int) -> int:
        """Raise `asset.expiring` once for each unstored asset whose task Kling created
        before `created_before` (epoch seconds); returns how many were raised."""
        ...


class Ledger(AssetQueue, EventOutbox, Protocol):
    """What the web app, poller and commands need from the database (workers need less)."""

    async def apply(self, update: Update) -> Applied:
        """Record a delivery and move its task forward; committed before it returns."""
        ...

    async def task(self, task_id: str) -> TaskRecord | None: ...

    async def tasks(
        self,
        *,
        status: TaskStatus | None = None,
        archived: bool | None = None,
        limit: int = 50,
        cursor: str | None = None,
        action: str | None = None,
        flagged: bool | None = None,
        since: str | None = None,
        until: str | None = None,
        search: str | None = None,
    ) -> TaskPage:
        """Tasks, newest first, a page at a time.

        `since` and `until` bound when the ledger first recorded a task (`since` included);
        `search` finds the task whose task_id or external_task_id it is, exactly.
        """
        ...

    async def asset_problems(
        self, *, state: AssetState | None = None, limit: int = 50, cursor: str | None = None
    ) -> ProblemPage:
        """Assets in one of PROBLEM_STATES (or in `state`) across tasks, newest first."""
        ...

    async def activity(self, since: str) -> Activity:
        """The overview's counts; deliveries per minute from `since` on."""
        ...

    async def events(self, task_id: str) -> list[EventRecord] | None:
        """A task's distinct deliveries, oldest first; None for an unknown task."""
        ...

    async def requeue(self, task_id: str, *, force: bool = False) -> int | None:
        """Queue a task's failed assets again (and its stored ones with `force`).

        Returns how many were queued, or None for an unknown task.
        """
        ...

    async def record_submission(
        self,
        action: str,
        params: dict[str, Any],
        external_task_id: str,
        idempotency_key: str | None,
    ) -> tuple[Submission, bool]:
        """Record a submission before Kling is called; with a known idempotency key,
        the earlier submission instead. The flag says whether this one is new."""
        ...

    async def submission(self, external_task_id: str) -> Submission | None: ...

    async def submission_failed(self, external_task_id: str, state: str, error: str) -> None:
        """Mark a submission that Kling refused (`refused`) or never received (`lost`)."""
        ...

    async def claim_stale_submissions(
        self, older_than: float, hold_seconds: float
    ) -> list[Submission]:
        """Submissions still pending after `older_than` seconds (their process died mid-call),
        each held for `hold_seconds` so no other process reconciles it meanwhile."""
        ...

    async def track(self, action: str, task_id: str) -> bool:
        """Adopt a task submitted elsewhere, to be polled now; False if it was known already."""
        ...

    async def claim_polls(self, limit: int, hold_seconds: float) -> list[PollJob]:
        """Tasks due a query, each held for `hold_seconds` so no other poller takes it."""
        ...

    async def poll_failed(self, task_id: str, retry_in: float | None, note: str | None) -> None:
        """A query got no answer: try again in `retry_in` seconds, or (None) give up with a note."""
        ...

    async def poll_everything_in_flight(self) -> int:
        """Schedule every unfinished task for a query now: callbacks missed while down."""
        ...

    async def mark(self, name: str) -> str | None:
        """A named bookmark of periodic work (where the last sweep ended), or None if unset."""
        ...

    async def set_mark(self, name: str, value: str) -> None:
        """Move a named bookmark; it survives restarts."""
        ...

    async def take_turn(self, name: str, owner: str, seconds: float) -> bool:
        """Hold the fleet-wide turn `name` for `seconds` if it is free, lapsed or `owner`'s.

        Periodic work that must run once across every process (the sweep) runs only in
        the process that holds its turn; it renews it each time, and another process
        takes over once a holder stops renewing.
        """
        ...

    async def backlog(self) -> Backlog:
        """Unfinished tasks and unstored assets: how many, the oldest, the soonest expiry.

        A few indexed aggregates, cheap enough for every metrics scrape.
        """
        ...

    async def stats(self) -> dict[str, int]:
        """Durable counters: polls made, verifications, tasks whose end was learned by polling."""
        ...

    async def ping(self) -> None:
        """Raise `LedgerUnavailable` unless the database answers."""
        ...
