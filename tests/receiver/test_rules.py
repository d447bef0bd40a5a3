"""The decision of `apply` on plain records: each rule, with no database and no clock."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
import pytest

from receiver._clock import stamp
from receiver._postgres import _IN_FLIGHT as _POSTGRES_IN_FLIGHT
from receiver._postgres.schema import MIGRATIONS as POSTGRES_MIGRATIONS
from receiver._sqlite.polls import _IN_FLIGHT
from receiver._sqlite.schema import MIGRATIONS
from receiver.ledger import Outcome, Update
from receiver.models import AssetState, CallbackRef, KlingTask, Source, TaskStatus
from receiver.rules import (
    AssetsQueued,
    DomainEvent,
    Known,
    Plan,
    SucceedHeld,
    TaskFailed,
    TaskFlagged,
    TaskRow,
    TaskStatusChanged,
    archived,
    awaits_confirmation,
    decide,
    in_flight,
    requeued,
)
from receiver.shapes import parse_task
from tests.pg_server import PostgresServer

T2V = "videos/text2video"
NOW = 1_800_000_000.0
RECEIVED = "2027-01-15T08:00:00.000Z"
EARLIER = "2027-01-15T07:00:00.000Z"
VIDEO_URL = "https://cdn.klingai.com/bs2/upload-kling-api/1/{}.mp4"
OWN = CallbackRef("x-E", T2V)  # the URL made for the task submitted as "E"


def task(status: str, updated_at: int | None = 1, task_id: str = "T", **fields: Any) -> KlingTask:
    data: dict[str, Any] = {"task_id": task_id, "task_status": status, "task_status_msg": "m"}
    if updated_at is not None:
        data["updated_at"] = updated_at
    return parse_task(data | fields)


def succeed(videos: int = 1, updated_at: int = 9, **fields: Any) -> KlingTask:
    result = {"videos": [{"id": f"v{n}", "url": VIDEO_URL.format(n)} for n in range(videos)]}
    return task("succeed", updated_at, task_result=result, **fields)


def update(kling: KlingTask, source: Source = Source.callback, **extra: Any) -> Update:
    body = json.dumps([kling.task_id, kling.task_status, kling.updated_at, extra.pop("salt", 0)])
    return Update(task=kling, body=body.encode(), source=source, received_at=RECEIVED, **extra)


def row(**fields: Any) -> TaskRow:
    """A stored task, heard of before with nothing in particular: change what a case needs."""
    stored = TaskRow(
        pk=1,
        task_id="T",
        external_task_id=None,
        action=T2V,
        callback_ref=None,
        submission=None,
        status=None,
        status_msg=None,
        kling_updated_at=None,
        state_digest=None,
        terminal_source=None,
        updates=1,
        updated_at=EARLIER,
        kling_created_at=None,
        next_poll_at=None,
        quiet_polls=0,
        polls=0,
        verifications=0,
        verify_due=False,
        flag=None,
    )
    return replace(stored, **fields)


def at(status: TaskStatus, updated_at: int = 1, **fields: Any) -> TaskRow:
    """A stored task whose state came from a delivery of `status` at `updated_at`."""
    return row(status=status, kling_updated_at=updated_at, state_digest="0" * 64, **fields)


@dataclass(frozen=True)
class Case:
    known: Known
    update: Update
    outcome: Outcome
    expect: dict[str, Any] = field(default_factory=dict)  # Plan fields, or row.<field>


def check(case: Case) -> Plan:
    plan = decide(case.known, case.update, NOW)
    assert plan.outcome is case.outcome
    for name, value in case.expect.items():
        if name.startswith("row."):
            assert plan.row is not None
            assert getattr(plan.row, name[4:]) == value, name
        else:
            assert getattr(plan, name) == value, name
    return plan


REFUSALS = {
    "a task bound to one URL refuses another": Case(
        Known(row(callback_ref="x-E", external_task_id="E")),
        update(task("processing"), ref=CallbackRef("h-any", None)),
        Outcome.refused,
        {"reason": "this task reports to another callback URL"},
    ),
    "a URL made for one task refuses another external_task_id": Case(
        Known(None),
        update(task("processing", task_info={"external_task_id": "F"}), ref=OWN),
        Outcome.refused,
        {"reason": "this callback URL was made for another task (external_task_id differs)"},
    ),
    "a URL made for one task refuses a second task": Case(
        Known(None, by_ref=row(pk=2, task_id="U", external_task_id="E", callback_ref="x-E")),
        update(task("processing"), ref=OWN),
        Outcome.refused,
        {"reason": "this callback URL belongs to another task"},
    ),
    "a task recorded apart from the submission its URL names": Case(
        Known(row(), by_ref=row(pk=2, task_id=None, external_task_id="E", callback_ref="x-E")),
        update(task("processing"), ref=OWN),
        Outcome.refused,
        {"reason": "this task is recorded under another external_task_id"},
    ),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_record_nothing(case: Case) -> None:
    """A refused delivery plans no row, no event, no files."""
    plan = check(case)
    assert (plan.row, plan.event, plan.assets, plan.happened) == (None, None, (), ())


STATES = {
    "a new task moves": Case(
        Known(None),
        update(task("submitted"), ref=OWN),
        Outcome.moved,
        {"target": None, "status": TaskStatus.submitted, "row.external_task_id": "E"},
    ),
    "a poll is never refused by a binding": Case(
        Known(row(callback_ref="x-E", external_task_id="E")),
        update(task("processing"), Source.poll),
        Outcome.moved,
        {"row.status": TaskStatus.processing, "row.polls": 1},
    ),
    "a lower status is kept, not applied": Case(
        Known(at(TaskStatus.processing)),
        update(task("submitted", 5)),
        Outcome.kept,
        {"status": TaskStatus.processing, "row.status": TaskStatus.processing, "row.updates": 2},
    ),
    "an unknown status is kept": Case(
        Known(at(TaskStatus.submitted)),
        update(task("queued")),
        Outcome.kept,
        {"row.status": TaskStatus.submitted},
    ),
    "a later updated_at moves within a status": Case(
        Known(at(TaskStatus.processing, 1)),
        update(task("processing", 2)),
        Outcome.moved,
        {"row.kling_updated_at": 2, "row.status_msg": "m"},
    ),
    "a terminal state is final": Case(
        Known(at(TaskStatus.failed)),
        update(succeed()),
        Outcome.kept,
        {"status": TaskStatus.failed, "assets": ()},
    ),
    "bytes seen before are a duplicate, only counted": Case(
        Known(at(TaskStatus.processing, next_poll_at=EARLIER), seen=True),
        update(succeed(), poll_after=30),
        Outcome.duplicate,
        {"status": TaskStatus.processing, "assets": (), "row.updates": 1},
    ),
    "a duplicate that changes nothing writes no row": Case(
        Known(at(TaskStatus.processing), seen=True),
        update(task("processing", 1)),
        Outcome.duplicate,
        {"row": None, "happened": ()},
    ),
}


@pytest.mark.parametrize("case", STATES.values(), ids=STATES.keys())
def test_states_move_forward_only(case: Case) -> None:
    check(case)


FILLING = {
    "what earlier deliveries could not know is filled in": Case(
        Known(row(action=None, kling_created_at=None)),
        update(task("processing", created_at=7), ref=OWN),
        Outcome.moved,
        {"row.action": T2V, "row.kling_created_at": 7, "row.callback_ref": "x-E"},
    ),
    "what the ledger holds is never overwritten": Case(
        Known(row(action="images/generations", kling_created_at=3, callback_ref="x-E")),
        update(task("processing", created_at=7), ref=OWN),
        Outcome.moved,
        {"row.action": "images/generations", "row.kling_created_at": 3},
    ),
    "Kling's answer accepts a pending submission": Case(
        Known(None, by_ref=row(task_id=None, external_task_id="E", submission="pending")),
        update(task("submitted"), Source.submit, ref=OWN),
        Outcome.moved,
        {"target": row(task_id=None, external_task_id="E", submission="pending")},
    ),
}


@pytest.mark.parametrize("case", FILLING.values(), ids=FILLING.keys())
def test_fields_are_filled_never_overwritten(case: Case) -> None:
    plan = check(case)
    assert plan.row is not None and plan.row.submission != "pending"


def test_an_external_task_id_stays_with_its_first_task() -> None:
    """Another row holding the task's external_task_id keeps it; the delivery is still kept."""
    holder = row(pk=2, task_id="U", external_task_id="F")
    case = Case(
        Known(None, holder=holder),
        update(task("submitted", task_info={"external_task_id": "F"})),
        Outcome.moved,
        {"row.external_task_id": None},
    )
    check(case)
    check(replace(case, known=Known(None), expect={"row.external_task_id": "F"}))


HELD = {
    "a succeed to confirm is held, its files not yet queued": Case(
        Known(at(TaskStatus.processing)),
        update(succeed(), confirm=True),
        Outcome.held,
        {
            "status": TaskStatus.processing,
            "assets": (),
            "row.verify_due": True,
            "row.next_poll_at": RECEIVED,
            "happened": (SucceedHeld("T"),),
        },
    ),
    "a task that cannot be queried is not held": Case(
        Known(None),
        update(succeed(), confirm=True),
        Outcome.moved,
        {"row.verify_due": False, "row.terminal_source": Source.callback},
    ),
    "the confirming query moves it, and the callback told us": Case(
        Known(at(TaskStatus.processing, verify_due=True), claim=succeed()),
        update(succeed(), Source.poll),
        Outcome.moved,
        {
            "row.verify_due": False,
            "row.verifications": 1,
            "row.polls": 0,
            "row.terminal_source": Source.callback,
            "row.flag": None,
            "row.next_poll_at": None,
        },
    ),
    "a query that contradicts the callback flags the task": Case(
        Known(at(TaskStatus.processing, verify_due=True), claim=succeed()),
        update(task("failed", 9), Source.poll),
        Outcome.moved,
        {
            "row.flag": "a callback said succeed, but Kling's API says failed",
            "row.terminal_source": Source.poll,
        },
    ),
    "a delivery meanwhile does not put the confirmation off": Case(
        Known(at(TaskStatus.processing, verify_due=True, next_poll_at=RECEIVED)),
        update(task("processing", 5), poll_after=30),
        Outcome.moved,
        {"row.next_poll_at": RECEIVED, "row.verify_due": True},
    ),
}


@pytest.mark.parametrize("case", HELD.values(), ids=HELD.keys())
def test_held_and_verified_succeeds(case: Case) -> None:
    check(case)


def test_the_event_of_a_held_succeed_is_not_applied() -> None:
    plan = check(HELD["a succeed to confirm is held, its files not yet queued"])
    assert plan.event is not None and not plan.event.applied


def test_a_held_claim_is_read_only_for_a_query_of_a_task_that_awaits_one() -> None:
    due = row(verify_due=True)
    assert awaits_confirmation(update(succeed(), Source.poll), due)
    assert not awaits_confirmation(update(succeed()), due)
    assert not awaits_confirmation(update(succeed(), Source.poll), row())
    assert not awaits_confirmation(update(succeed(), Source.poll), None)


SCHEDULE = {
    "an unfinished task is queried again after poll_after": Case(
        Known(at(TaskStatus.submitted)),
        update(task("processing"), poll_after=30),
        Outcome.moved,
        {"row.next_poll_at": stamp(NOW + 30)},
    ),
    "a finished task is not queried again": Case(
        Known(at(TaskStatus.processing, next_poll_at=EARLIER)),
        update(task("failed", 2), poll_after=30),
        Outcome.moved,
        {"row.next_poll_at": None},
    ),
    "without poll_after the schedule stays": Case(
        Known(at(TaskStatus.submitted, next_poll_at=EARLIER)),
        update(task("processing")),
        Outcome.moved,
        {"row.next_poll_at": EARLIER},
    ),
    "a query that brings nothing new is quiet": Case(
        Known(at(TaskStatus.processing, 5, quiet_polls=2)),
        update(task("processing", 1), Source.poll),
        Outcome.kept,
        {"row.quiet_polls": 3, "row.polls": 1},
    ),
    "a query that brings news ends the quiet": Case(
        Known(at(TaskStatus.processing, 1, quiet_polls=2)),
        update(task("processing", 5), Source.poll),
        Outcome.moved,
        {"row.quiet_polls": 0, "row.polls": 1},
    ),
}


@pytest.mark.parametrize("case", SCHEDULE.values(), ids=SCHEDULE.keys())
def test_next_query(case: Case) -> None:
    check(case)


def test_the_first_succeed_queues_its_files() -> None:
    plan = check(Case(Known(at(TaskStatus.processing)), update(succeed(videos=2)), Outcome.moved))
    assert [spec.url for spec in plan.assets] == [VIDEO_URL.format(0), VIDEO_URL.format(1)]
    assert plan.happened == (
        TaskStatusChanged("T", TaskStatus.processing, TaskStatus.succeed, Source.callback),
        AssetsQueued("T", 2),
    )


TAKE_OVERS = {
    "a task's own URL takes over what a hand-made URL bound": Case(
        Known(at(TaskStatus.succeed, 9, callback_ref="h-any", external_task_id="F")),
        update(task("processing", 5), ref=OWN),
        Outcome.moved,
        {
            "drop_unstarted": True,
            "row.external_task_id": "E",
            "row.callback_ref": "x-E",
            "row.status": TaskStatus.processing,
            "happened": (TaskStatusChanged("T", None, TaskStatus.processing, Source.callback),),
        },
    ),
    "an id a hand-made URL bound goes to its own URL's task": Case(
        Known(None, by_ref=row(pk=2, task_id="U", external_task_id="E", callback_ref="h-any")),
        update(task("submitted"), ref=OWN),
        Outcome.moved,
        {"give_up": 2, "target": None, "row.external_task_id": "E"},
    ),
    "a task heard first through a hand-made URL joins its submission": Case(
        Known(
            at(TaskStatus.processing, 5, callback_ref="h-any"),
            by_ref=row(pk=2, task_id=None, external_task_id="E", callback_ref="x-E"),
        ),
        update(task("submitted", 1), Source.submit, ref=OWN),
        Outcome.moved,
        {"merge": 1, "drop_unstarted": False, "row.pk": 2, "row.task_id": "T"},
    ),
}


@pytest.mark.parametrize("case", TAKE_OVERS.values(), ids=TAKE_OVERS.keys())
def test_take_overs(case: Case) -> None:
    check(case)


def test_a_failure_is_told() -> None:
    plan = check(Case(Known(at(TaskStatus.processing)), update(task("failed", 2)), Outcome.moved))
    assert plan.happened == (
        TaskStatusChanged("T", TaskStatus.processing, TaskStatus.failed, Source.callback),
        TaskFailed("T", "m"),
    )


def test_news_within_a_status_is_no_status_change() -> None:
    plan = check(
        Case(Known(at(TaskStatus.processing, 1)), update(task("processing", 2)), Outcome.moved)
    )
    assert plan.happened == ()


def test_a_flag_is_told() -> None:
    plan = check(HELD["a query that contradicts the callback flags the task"])
    flagged: list[DomainEvent] = [e for e in plan.happened if isinstance(e, TaskFlagged)]
    assert flagged == [TaskFlagged("T", "a callback said succeed, but Kling's API says failed")]


def test_the_decision_is_the_same_every_time() -> None:
    """No clock or database inside: the same records give the same plan."""
    case = STATES["a new task moves"]
    assert decide(case.known, case.update, NOW) == decide(case.known, case.update, NOW)


IN_FLIGHT = {
    "new, identified and queryable": (row(), True),
    "unfinished": (at(TaskStatus.processing), True),
    "finished": (at(TaskStatus.succeed), False),
    "failed": (at(TaskStatus.failed), False),
    "a held succeed awaits its query": (at(TaskStatus.succeed, verify_due=True), True),
    "a submission without its task_id": (row(task_id=None), False),
    "a task whose action is unknown": (row(action=None), False),
}


@pytest.mark.parametrize(("stored", "expected"), IN_FLIGHT.values(), ids=IN_FLIGHT.keys())
def test_in_flight(stored: TaskRow, expected: bool) -> None:
    assert in_flight(stored) is expected


@pytest.mark.parametrize(("stored", "expected"), IN_FLIGHT.values(), ids=IN_FLIGHT.keys())
def test_the_poller_sql_follows_in_flight(stored: TaskRow, expected: bool) -> None:
    """SQLite's condition for what the poller may query picks the tasks `in_flight` does."""
    conn = sqlite3.connect(":memory:")
    for statements in MIGRATIONS:
        for statement in statements:
            conn.execute(statement)
    conn.execute(
        "INSERT INTO tasks (task_id, action, status, verify_due, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, '', '')",
        (stored.task_id, stored.action, stored.status, stored.verify_due),
    )
    found = conn.execute(f"SELECT count(*) FROM tasks WHERE {_IN_FLIGHT}").fetchone()[0]
    assert bool(found) is expected


STORED, FAILED, PENDING = AssetState.stored, AssetState.failed, AssetState.pending
ARCHIVED = {
    "every file stored": ([STORED, STORED], True),
    "one still pending": ([STORED, PENDING], False),
    "one failed": ([FAILED, STORED], False),
    "no files": ([], False),
}


@pytest.mark.parametrize(("files", "expected"), ARCHIVED.values(), ids=ARCHIVED.keys())
def test_archived(files: list[AssetState], expected: bool) -> None:
    assert archived(files) is expected


REQUEUED = {
    "failed": (FAILED, False, True),
    "stored": (STORED, False, False),
    "stored, forced": (STORED, True, True),
    "pending": (PENDING, True, False),
    "downloading": (AssetState.downloading, True, False),
}


@pytest.mark.parametrize(("state", "force", "expected"), REQUEUED.values(), ids=REQUEUED.keys())
def test_requeued(state: AssetState, force: bool, expected: bool) -> None:
    assert requeued(state, force=force) is expected


@pytest.fixture(scope="module")
def postgres_tasks(postgres: PostgresServer) -> Iterator[psycopg.Connection[Any]]:
    """A connection to a PostgreSQL database holding the PostgreSQL ledger's schema."""
    url = postgres.create_database()
    with psycopg.connect(url, autocommit=True) as conn:
        for statements in POSTGRES_MIGRATIONS:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]
        yield conn


@pytest.mark.parametrize(("stored", "expected"), IN_FLIGHT.values(), ids=IN_FLIGHT.keys())
def test_the_postgresql_poller_sql_follows_in_flight(
    postgres_tasks: psycopg.Connection[Any], stored: TaskRow, expected: bool
) -> None:
    """PostgreSQL's condition for what the poller may query picks the tasks `in_flight` does."""
    with postgres_tasks.transaction(force_rollback=True):
        postgres_tasks.execute(
            "INSERT INTO tasks (task_id, action, status, verify_due, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, '', '')",
            (
                stored.task_id,
                stored.action,
                None if stored.status is None else stored.status.value,
                stored.verify_due,
            ),
        )
        found = postgres_tasks.execute(
            f"SELECT count(*) FROM tasks WHERE {_POSTGRES_IN_FLIGHT}"
        ).fetchone()
        assert found is not None and bool(found[0]) is expected
