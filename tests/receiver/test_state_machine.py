"""Property tests: whatever order and however often deliveries arrive, a task ends the same."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver._clock import utc_now
from receiver.database import open_ledger
from receiver.ledger import StateKey, Update, moves_forward
from receiver.models import AssetRecord, CallbackRef, Source, TaskStatus
from receiver.shapes import parse_task
from tests.pg_server import PostgresServer

TERMINAL = [TaskStatus.succeed, TaskStatus.failed]
REF = CallbackRef("x-kr_prop", "videos/text2video")

# Few distinct times, so that equal times (broken by the digest) come up often.
times = st.none() | st.integers(min_value=0, max_value=2)


def fold(keys: list[StateKey]) -> StateKey | None:
    """The key a task ends with after these deliveries, in this order."""
    current = None
    for key in keys:
        if moves_forward(current, key):
            current = key
    return current


@st.composite
def key_sets(draw: st.DrawFn) -> list[StateKey]:
    """Distinct deliveries' keys: non-terminal and unknown ones, and at most one terminal."""
    count = draw(st.integers(min_value=0, max_value=6))
    digests = draw(
        st.lists(
            st.text("0123456789abcdef", min_size=1, max_size=3),
            min_size=count + 1,
            max_size=count + 1,
            unique=True,
        )
    )
    statuses = st.sampled_from([None, TaskStatus.submitted, TaskStatus.processing])
    keys = [StateKey(draw(statuses), draw(times), digest) for digest in digests[:count]]
    if draw(st.booleans()):
        keys.append(StateKey(draw(st.sampled_from(TERMINAL)), draw(times), digests[count]))
    return keys


def arrival(data: st.DataObject, items: list[Any]) -> list[Any]:
    """Some order of `items` with some of them repeated, as a flaky sender would deliver them."""
    if not items:
        return []
    repeats = data.draw(st.lists(st.sampled_from(items), max_size=len(items) + 2))
    return list(data.draw(st.permutations(items + repeats)))


@settings(max_examples=200, deadline=None)
@given(keys=key_sets(), data=st.data())
def test_any_order_of_keys_ends_with_the_same_key(
    keys: list[StateKey], data: st.DataObject
) -> None:
    """Folding deliveries in any order, with repeats, ends with the same key."""
    final = fold(keys)
    assert fold(arrival(data, keys)) == final
    terminal = [key for key in keys if key.status in TERMINAL]
    if terminal:
        assert final == terminal[0]
    if all(key.status is None for key in keys):
        assert final is None


def test_unknown_status_never_moves() -> None:
    """An unknown status moves neither a new task nor a known one."""
    unknown = StateKey(None, 9, "f")
    assert not moves_forward(None, unknown)
    assert not moves_forward(StateKey(TaskStatus.submitted, 0, "a"), unknown)


def test_any_known_status_moves_a_new_task() -> None:
    """The first known status always moves a task that has none."""
    for status in TaskStatus:
        assert moves_forward(None, StateKey(status, None, "a"))


def test_terminal_is_final_even_against_another_terminal() -> None:
    """Once terminal, a task does not move, even for a different terminal body."""
    done = StateKey(TaskStatus.succeed, 5, "a")
    for status in TaskStatus:
        assert not moves_forward(done, StateKey(status, 9, "f"))


def test_rank_beats_time_and_time_beats_digest() -> None:
    """A higher status wins over a later time; among equals, the later time, then the digest."""
    processing = StateKey(TaskStatus.processing, 1, "a")
    assert not moves_forward(processing, StateKey(TaskStatus.submitted, 9, "f"))
    assert moves_forward(processing, StateKey(TaskStatus.processing, 2, "0"))
    assert not moves_forward(processing, StateKey(TaskStatus.processing, None, "f"))
    assert moves_forward(processing, StateKey(TaskStatus.processing, 1, "b"))
    assert not moves_forward(processing, processing)


def task_body(status: str, updated_at: int | None, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "task_id": "867283741759111999",
        "task_status": status,
        "created_at": 1764043200000,
        "task_info": {"external_task_id": "kr_prop"},
    }
    if updated_at is not None:
        data["updated_at"] = updated_at
    return data | fields


def encode(data: dict[str, Any], indent: int | None) -> bytes:
    return json.dumps(data, indent=indent).encode()


@st.composite
def progress_bodies(draw: st.DrawFn) -> list[bytes]:
    """Submitted or processing deliveries sharing one updated_at, in other words or bytes."""
    status = draw(st.sampled_from(["submitted", "processing"]))
    updated_at = draw(times)
    messages = draw(st.lists(st.sampled_from(["", "queued", "rendering"]), min_size=1, max_size=3))
    return [
        encode(
            task_body(status, updated_at, task_status_msg=message),
            draw(st.sampled_from([None, 2])),
        )
        for message in messages
    ]


@st.composite
def terminal_bodies(draw: st.DrawFn) -> bytes:
    """The one terminal delivery: succeed with 1-3 videos or images, or failed."""
    updated_at = draw(times)
    if draw(st.booleans()):
        return encode(task_body("failed", updated_at, task_status_msg="risk control"), None)
    kind = draw(st.sampled_from(["videos", "images"]))
    count = draw(st.integers(min_value=1, max_value=3))
    files = [{"url": f"https://cdn.klingai.com/{kind}/{n}"} for n in range(count)]
    return encode(task_body("succeed", updated_at, task_result={kind: files}), None)


@st.composite
def deliveries(draw: st.DrawFn, finished: bool = True) -> list[bytes]:
    """A task's distinct deliveries in their natural order, ending with its terminal one if any."""
    groups = draw(st.lists(progress_bodies(), min_size=0 if finished else 1, max_size=3))
    bodies = [raw for group in groups for raw in group]
    if draw(st.booleans()):
        bodies.append(encode(task_body("queued_v2", draw(times)), None))
    if finished:
        bodies.append(draw(terminal_bodies()))
    return list(dict.fromkeys(bodies))


Final = tuple[TaskStatus | None, str | None, int | None, tuple[AssetRecord, ...], int]
Fresh = Callable[[], str]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fresh(request: pytest.FixtureRequest) -> Iterator[Fresh]:
    """A function giving the URL of an empty ledger on each backend, for every example.

    SQLite: a new file each time. PostgreSQL: one database for the module, emptied each time
    (a new database for each of hundreds of examples would cost far more than the examples).
    """
    if request.param == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            count = iter(range(1_000_000))
            yield lambda: f"sqlite:///{Path(directory) / f'l{next(count)}.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database()

    def emptied() -> str:
        with psycopg.connect(url, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('tasks') IS NOT NULL").fetchone()
            if exists is not None and exists[0]:
                conn.execute("TRUNCATE events, assets, tasks RESTART IDENTITY")
        return url

    yield emptied


def final_state(fresh: Fresh, bodies: list[bytes]) -> Final:
    """The task as a fresh ledger records it after these deliveries, applied one by one."""

    async def run(database_url: str) -> Final:
        async with open_ledger(database_url) as ledger:
            for raw in bodies:
                update = Update(
                    task=parse_task(json.loads(raw)),
                    body=raw,
                    source=Source.callback,
                    received_at=utc_now(),
                    ref=REF,
                )
                await ledger.apply(update)
            task = await ledger.task("867283741759111999")
        assert task is not None
        return task.status, task.status_msg, task.kling_updated_at, task.assets, task.updates

    return asyncio.run(run(fresh()))


@settings(max_examples=40, deadline=None)
@given(bodies=deliveries(), data=st.data())
def test_any_order_of_deliveries_ends_with_the_same_task(
    fresh: Fresh, bodies: list[bytes], data: st.DataObject
) -> None:
    """On the real ledger, any order of a task's deliveries, with repeats, ends the same."""
    expected = final_state(fresh, bodies)
    terminal = json.loads(bodies[-1])
    assert expected[0] == TaskStatus(terminal["task_status"])
    assert expected[2] == terminal.get("updated_at")
    assert expected[4] == len(bodies)
    assert final_state(fresh, arrival(data, bodies)) == expected


@settings(max_examples=40, deadline=None)
@given(bodies=deliveries(finished=False), data=st.data())
def test_any_order_of_deliveries_leaves_an_unfinished_task_the_same(
    fresh: Fresh, bodies: list[bytes], data: st.DataObject
) -> None:
    """Before the terminal delivery, any order of progress deliveries, with repeats, agrees."""
    expected = final_state(fresh, bodies)
    assert expected[0] in (TaskStatus.submitted, TaskStatus.processing)
    assert expected[3] == ()
    assert expected[4] == len(bodies)
    assert final_state(fresh, arrival(data, bodies)) == expected
