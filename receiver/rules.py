"""What one delivery does to the ledger, decided as a pure function over plain records.

`decide` holds every rule of `Ledger.apply`: refusals by binding, who keeps an
external_task_id, filling in what earlier deliveries could not know, take-overs
of what a hand-made URL bound, held and verified succeeds, the next query's
time, duplicates and the files a first succeed queues. It reads no database and
no clock: a backend reads what it needs under its write lock (`Known`), calls
it, and writes the `Plan` it returns, so every backend applies the same rules.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

from receiver._clock import stamp
from receiver.ledger import (
    Binding,
    Outcome,
    StateKey,
    Update,
    binding_conflict,
    contradiction,
    moves_forward,
    yields_to,
)
from receiver.models import AssetSpec, AssetState, KlingTask, PayloadError, Source, TaskStatus
from receiver.shapes import parse_task

__all__ = [
    "AssetExpiring",
    "AssetFailed",
    "AssetStored",
    "AssetsQueued",
    "DomainEvent",
    "EventRow",
    "Known",
    "Plan",
    "SucceedHeld",
    "TaskArchived",
    "TaskFailed",
    "TaskFlagged",
    "TaskRow",
    "TaskStatusChanged",
    "archived",
    "awaits_confirmation",
    "claimed",
    "decide",
    "decode_cursor",
    "encode_cursor",
    "in_flight",
    "requeued",
    "settled",
]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class TaskRow:
    """A task as the ledger stores it: the fields the rules of `apply` read and write."""

    pk: int | None  # the backend's key for the row; None for a task not stored yet
    task_id: str | None  # None for a submission Kling has not answered yet
    external_task_id: str | None
    action: str | None
    callback_ref: str | None  # the callback URL the task is bound to
    submission: str | None  # pending | accepted | refused | lost, for submitted tasks
    status: TaskStatus | None
    status_msg: str | None
    kling_updated_at: int | None
    state_digest: str | None  # the digest of the delivery the state came from
    terminal_source: Source | None  # what told us the task finished
    updates: int  # deliveries recorded, duplicates not counted
    updated_at: str
    kling_created_at: int | None
    next_poll_at: str | None
    quiet_polls: int  # queries in a row that brought nothing new
    polls: int
    verifications: int
    verify_due: bool  # a held succeed awaits its confirming query
    flag: str | None  # why a human should look at the task

    @property
    def binding(self) -> Binding:
        """The task's identity, as the binding rules see it."""
        return Binding(self.task_id, self.external_task_id, self.callback_ref)

    @property
    def state(self) -> StateKey | None:
        """What orders the next delivery against this row's state; None before the first."""
        if self.state_digest is None:
            return None
        return StateKey(self.status, self.kling_updated_at, self.state_digest)


@dataclass(frozen=True, slots=True)
class Known:
    """What the ledger holds that a delivery names, read under the write lock before `decide`."""

    row: TaskRow | None  # the row with the delivery's task_id
    by_ref: TaskRow | None = None  # the row holding the callback URL's external_task_id
    holder: TaskRow | None = None  # the row holding the task's own external_task_id
    claim: KlingTask | None = None  # the held succeed, read when `awaits_confirmation`
    seen: bool = False  # the same bytes came before from the same source


@dataclass(frozen=True, slots=True)
class EventRow:
    """A delivery to keep in its task's event log; the bytes and headers come with the update."""

    source: Source
    status: str  # the status word as delivered, known or not
    digest: str
    applied: bool  # False for a delivery that did not move the task, or a held succeed


@dataclass(frozen=True, slots=True)
class TaskStatusChanged:
    """A task's status moved to another one."""

    task_id: str
    before: TaskStatus | None
    after: TaskStatus
    source: Source


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """A task finished without a result."""

    task_id: str
    message: str | None


@dataclass(frozen=True, slots=True)
class SucceedHeld:
    """A succeed callback waits for Kling's API to confirm it before its files are queued."""

    task_id: str


@dataclass(frozen=True, slots=True)
class TaskFlagged:
    """A confirming query contradicted a held succeed callback."""

    task_id: str
    flag: str


@dataclass(frozen=True, slots=True)
class AssetStored:
    """A file is stored and verified."""

    task_id: str
    asset_pk: int


@dataclass(frozen=True, slots=True)
class AssetFailed:
    """A file's download gave up."""

    task_id: str
    asset_pk: int


@dataclass(frozen=True, slots=True)
class TaskArchived:
    """Every file of a task is stored."""

    task_id: str


@dataclass(frozen=True, slots=True)
class AssetExpiring:
    """A file not stored yet nears the day Kling deletes it."""

    task_id: str
    asset_pk: int


@dataclass(frozen=True, slots=True)
class AssetsQueued:
    """A first succeed named files to download (a file already begun is kept as it is)."""

    task_id: str
    count: int


DomainEvent = (
    TaskStatusChanged
    | TaskFailed
    | SucceedHeld
    | TaskFlagged
    | AssetsQueued
    | AssetStored
    | AssetFailed
    | TaskArchived
    | AssetExpiring
)


@dataclass(frozen=True, slots=True)
class Plan:
    """What applying one delivery does, for a backend to write in this order.

    First `give_up`, then `merge`, then `drop_unstarted`; then the task (`row`
    inserted when `target` is None, else written over it), the event, and the assets.
    """

    outcome: Outcome
    status: TaskStatus | None = None  # the task's status once written (None when refused)
    reason: str | None = None  # why a refused delivery was refused
    target: TaskRow | None = None  # the stored row the delivery lands on; None: a new task
    row: TaskRow | None = None  # the row once written; None when refused or nothing changes
    event: EventRow | None = None  # None when refused
    assets: tuple[AssetSpec, ...] = ()
    # The row whose external_task_id moves to this task: it was bound by a hand-made URL.
    give_up: int | None = None
    # The row heard through a hand-made URL that becomes part of `target`, the submission it
    # belongs to: its unstarted files are dropped, its events and files move, the row goes.
    merge: int | None = None
    # A take-over: the files earlier deliveries named that no download has begun are dropped.
    drop_unstarted: bool = False
    happened: tuple[DomainEvent, ...] = ()


def awaits_confirmation(update: Update, row: TaskRow | None) -> bool:
    """Whether `decide` checks a held succeed on this row, which the backend then reads.

    `row` is the row the delivery lands on: by task_id, else by the URL's external_task_id.
    """
    return update.source is Source.poll and row is not None and row.verify_due


def decide(known: Known, update: Update, now: float) -> Plan:
    """What `update` does, given what the ledger holds; `now` is seconds since the epoch.

    A backend that learns only while writing the event that its bytes came before
    (`known.seen`) decides again with `seen` set, before it writes the task.
    """
    task, ref = update.task, update.ref
    ref_ext = None if ref is None else ref.external_task_id
    row, by_ref = known.row, known.by_ref
    reason = binding_conflict(ref, task, _binding(row), _binding(by_ref))
    if reason is not None:
        return Plan(Outcome.refused, reason=reason)
    taken_over = yields_to(ref, _binding(row))
    give_up = merge = None
    if by_ref is not None and (row is None or row.pk != by_ref.pk):
        if yields_to(ref, by_ref.binding):
            # Another task named this external_task_id through a hand-made URL: the URL
            # made for it outranks that, so the id comes here.
            give_up, by_ref = by_ref.pk, None
        elif row is None:
            pass  # the submission that made this URL, hearing of its task for the first time
        elif taken_over and by_ref.task_id is None:
            # The service's own submission, not yet told its task_id: the task heard
            # through a hand-made URL first becomes part of it.
            merge, row, taken_over = row.pk, None, False
        else:
            return Plan(
                Outcome.refused, reason="this task is recorded under another external_task_id"
            )

    row = row if row is not None else by_ref
    action = update.effective_action
    external_task_id = _kept_external_task_id(known, update, row, by_ref)
    if row is None:
        stored = _new_row(update, external_task_id, action)
        filled = stored
    else:
        stored = row
        filled = _filled(row, update, external_task_id, action)
        if taken_over:
            assert ref_ext is not None  # only a task's own URL takes over
            filled = _take_over(filled, ref_ext, action)

    # The state as it stands, from `filled`: a take-over has set aside what the
    # hand-made URL's deliveries said.
    status, digest = task.status, update.digest
    moved = moves_forward(filled.state, StateKey(status, task.updated_at, digest))
    # Only a task whose action is known can be queried; holding any other would hold it forever.
    queryable = (stored.action or action) is not None
    held = moved and update.confirm and status is TaskStatus.succeed and queryable
    verifying = update.source is Source.poll and filled.verify_due
    flag = None
    if verifying and known.claim is not None:
        flag = contradiction(known.claim, task)
    if known.seen:
        outcome = Outcome.duplicate
    else:
        outcome = (Outcome.held if held else Outcome.moved) if moved else Outcome.kept
    after = _settled(
        filled, update, outcome, digest=digest, verifying=verifying, flag=flag, now=now
    )
    assets: tuple[AssetSpec, ...] = ()
    if outcome is Outcome.moved and status is TaskStatus.succeed:
        # Terminal states are final, so this happens once per task: the first succeed names
        # the files.
        assets = tuple(task.assets(watermarked=update.archive_watermarked))
    return Plan(
        outcome,
        status=status if outcome is Outcome.moved else filled.status,
        target=row,
        row=None if after == row else after,
        event=EventRow(
            update.source,
            task.task_status if status is None else status.value,
            digest,
            applied=moved and not held,
        ),
        assets=assets,
        give_up=give_up,
        merge=merge,
        drop_unstarted=taken_over,
        happened=_happened(update, filled.status, outcome, flag, len(assets)),
    )


def _kept_external_task_id(
    known: Known, update: Update, row: TaskRow | None, by_ref: TaskRow | None
) -> str | None:
    """The external_task_id this delivery gives its task: None when another task holds it.

    External ids are unique per Kling account only (a shared URL may serve several), so
    an id stays with its first task and this delivery is still kept, not lost to a clash.
    """
    ref_ext = None if update.ref is None else update.ref.external_task_id
    external_task_id = update.task.external_task_id or ref_ext
    if external_task_id is None:
        return None
    # When not refused, a URL made for one task names the same one, so `by_ref` is its
    # holder; else the task's own row may hold it.
    if external_task_id == ref_ext:
        holder = by_ref
    elif row is not None and row.external_task_id == external_task_id:
        holder = row
    else:
        holder = known.holder
    if holder is not None and (row is None or holder.pk != row.pk):
        return None
    return external_task_id


def _new_row(update: Update, external_task_id: str | None, action: str | None) -> TaskRow:
    """The row of a task heard of for the first time, before this delivery is counted."""
    return TaskRow(
        pk=None,
        task_id=update.task.task_id,
        external_task_id=external_task_id,
        action=action,
        callback_ref=None if update.ref is None else update.ref.ref,
        submission=None,
        status=None,
        status_msg=None,
        kling_updated_at=None,
        state_digest=None,
        terminal_source=None,
        updates=0,
        updated_at=update.received_at,
        kling_created_at=update.task.created_at,
        next_poll_at=None,
        quiet_polls=0,
        polls=0,
        verifications=0,
        verify_due=False,
        flag=None,
    )


def _filled(
    row: TaskRow, update: Update, external_task_id: str | None, action: str | None
) -> TaskRow:
    """`row` with what earlier deliveries could not know filled in, never overwriting."""
    ref = update.ref
    # Built whole rather than with dataclasses.replace, which costs several times more.
    return TaskRow(
        pk=row.pk,
        task_id=_first(row.task_id, update.task.task_id),
        external_task_id=_first(row.external_task_id, external_task_id),
        action=_first(row.action, action),
        callback_ref=_first(row.callback_ref, None if ref is None else ref.ref),
        # Kling answering about a pending submission means it was accepted.
        submission="accepted" if row.submission == "pending" else row.submission,
        status=row.status,
        status_msg=row.status_msg,
        kling_updated_at=row.kling_updated_at,
        state_digest=row.state_digest,
        terminal_source=row.terminal_source,
        updates=row.updates,
        updated_at=row.updated_at,
        kling_created_at=_first(row.kling_created_at, update.task.created_at),
        next_poll_at=row.next_poll_at,
        quiet_polls=row.quiet_polls,
        polls=row.polls,
        verifications=row.verifications,
        verify_due=row.verify_due,
        flag=row.flag,
    )


def _take_over(filled: TaskRow, external_task_id: str, action: str | None) -> TaskRow:
    """Bind a task heard through a hand-made URL to its own URL, which outranks that one.

    The URL's external_task_id and action replace what the hand-made URL's deliveries
    said, and so does their state (those deliveries stay in the event log): the state is
    cleared, so this delivery is judged as the first; the plan drops the files they named
    that no download has begun on.
    """
    return replace(
        filled,
        external_task_id=external_task_id,
        callback_ref=f"x-{external_task_id}",
        action=action or filled.action,
        status=None,
        status_msg=None,
        kling_updated_at=None,
        state_digest=None,
        terminal_source=None,
        verify_due=False,
    )


def _settled(
    filled: TaskRow,
    update: Update,
    outcome: Outcome,
    *,
    digest: str,
    verifying: bool,
    flag: str | None,
    now: float,
) -> TaskRow:
    """The task's row once this delivery is recorded with `outcome`."""
    task, received_at = update.task, update.received_at
    polled = update.source is Source.poll
    counted = outcome is not Outcome.duplicate
    moved = outcome is Outcome.moved
    state = task.status if moved else filled.status
    learned_from = filled.terminal_source
    if moved:
        assert state is not None
        learned_from = update.source if state.terminal else None
        if learned_from is Source.poll and filled.verify_due and state is TaskStatus.succeed:
            # The query only confirmed what a held succeed callback said: the callback told us.
            learned_from = Source.callback
    # Poll bookkeeping: count the query, check a held succeed, schedule the next query.
    next_poll_at = filled.next_poll_at
    if outcome is Outcome.held:
        next_poll_at = received_at  # confirm it now
    elif filled.verify_due and not verifying:
        pass  # a held succeed still awaits its confirming query: a duplicate must not put it off
    elif state is not None and state.terminal:
        next_poll_at = None
    elif update.poll_after is not None:
        next_poll_at = stamp(now + update.poll_after)
    quiet = polled and outcome in (Outcome.duplicate, Outcome.kept)
    verify_due = filled.verify_due
    if outcome is Outcome.held:
        verify_due = True
    elif verifying:
        verify_due = False
    return TaskRow(
        pk=filled.pk,
        task_id=filled.task_id,
        external_task_id=filled.external_task_id,
        action=filled.action,
        callback_ref=filled.callback_ref,
        submission=filled.submission,
        status=state,
        status_msg=task.task_status_msg if moved else filled.status_msg,
        kling_updated_at=task.updated_at if moved else filled.kling_updated_at,
        state_digest=digest if moved else filled.state_digest,
        terminal_source=learned_from,
        updates=filled.updates + 1 if counted else filled.updates,
        updated_at=received_at if counted else filled.updated_at,
        kling_created_at=filled.kling_created_at,
        next_poll_at=next_poll_at,
        quiet_polls=filled.quiet_polls + 1 if quiet else 0,
        polls=filled.polls + 1 if polled and not verifying else filled.polls,
        verifications=filled.verifications + 1 if verifying else filled.verifications,
        verify_due=verify_due,
        flag=filled.flag if flag is None else flag,
    )


def _happened(
    update: Update, before: TaskStatus | None, outcome: Outcome, flag: str | None, queued: int
) -> tuple[DomainEvent, ...]:
    """The domain events of a delivery recorded with `outcome`, for the outbox to publish."""
    task, status = update.task, update.task.status
    happened: list[DomainEvent] = []
    if outcome is Outcome.moved:
        assert status is not None
        if status is not before:
            happened.append(TaskStatusChanged(task.task_id, before, status, update.source))
        if status is TaskStatus.failed:
            happened.append(TaskFailed(task.task_id, task.task_status_msg))
    elif outcome is Outcome.held:
        happened.append(SucceedHeld(task.task_id))
    if flag is not None:
        happened.append(TaskFlagged(task.task_id, flag))
    if queued:
        happened.append(AssetsQueued(task.task_id, queued))
    return tuple(happened)


def _binding(row: TaskRow | None) -> Binding | None:
    return None if row is None else row.binding


def _first(known: _T | None, learned: _T | None) -> _T | None:
    """`known` unless it is None: what the ledger holds is never overwritten."""
    return learned if known is None else known


def in_flight(row: TaskRow) -> bool:
    """Whether the poller may query a task: identified, queryable and not finished.

    A finished task whose succeed is held still counts: the query confirms it.
    """
    unfinished = row.status is None or not row.status.terminal or row.verify_due
    return row.task_id is not None and row.action is not None and unfinished


def archived(files: Iterable[AssetState]) -> bool:
    """Whether a task with these files counts as archived: it has some, and all are stored."""
    states = list(files)
    return bool(states) and all(state is AssetState.stored for state in states)


def settled(
    task_id: str, asset_pk: int, state: AssetState, *, archived_now: bool
) -> tuple[DomainEvent, ...]:
    """The domain events of a download attempt that ended in `state`.

    `archived_now` says the backend, applying `archived` to the task's files after this
    one, found the task archived and it was not before.
    """
    if state is AssetState.failed:
        return (AssetFailed(task_id, asset_pk),)
    if state is not AssetState.stored:
        return ()  # queued again: nothing happened yet
    stored = AssetStored(task_id, asset_pk)
    return (stored, TaskArchived(task_id)) if archived_now else (stored,)


def requeued(state: AssetState, *, force: bool) -> bool:
    """Whether `requeue` queues a file again: a failed one, and with `force` a stored one too.

    A task with a file queued again is no longer archived.
    """
    return state is AssetState.failed or (force and state is AssetState.stored)


def claimed(body: bytes) -> KlingTask | None:
    """The task a held succeed callback's stored bytes claimed (`Known.claim`), if they parse."""
    try:
        return parse_task(json.loads(body))
    except (ValueError, PayloadError):
        return None


def encode_cursor(pk: int) -> str:
    """The public paging cursor of `Ledger.tasks`: the next page starts below task `pk`."""
    return base64.urlsafe_b64encode(f"id:{pk}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The task key a cursor from `encode_cursor` names; ValueError for any other text."""
    if not cursor:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text.startswith("id:") and 0 < (pk := int(text[3:])) < 2**63:
            return pk  # beyond a 64-bit integer key, the query itself would fail
    except (ValueError, UnicodeDecodeError):
        pass
    raise ValueError("cursor is not one this service returned")
