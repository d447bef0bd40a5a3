"""The Kling task object: lenient parsing, strict task ids, assets, and the status order."""

from __future__ import annotations

import json
from typing import Any

import pytest

from receiver.models import AssetKind, AssetSpec, PayloadError, TaskStatus
from receiver.shapes import parse_task
from tests.support import FIXTURES, fixture_json

CALLBACKS = sorted(path.name for path in FIXTURES.glob("callback_*.json"))
URL = "https://cdn.klingai.com/bs2/upload-kling-api/1/{}.png"


def task_body(**fields: Any) -> dict[str, Any]:
    return {"task_id": "867283741759111202", "task_status": "processing"} | fields


def images(*indexes: int | None) -> dict[str, Any]:
    entries = []
    for position, index in enumerate(indexes):
        entry: dict[str, Any] = {"url": URL.format(position)}
        if index is not None:
            entry["index"] = index
        entries.append(entry)
    return {"images": entries}


def refusal(data: Any) -> str:
    with pytest.raises(PayloadError) as caught:
        parse_task(data)
    return str(caught.value)


def test_fixtures_are_present() -> None:
    """The callback samples are inside the repository, where the suite looks for them."""
    assert len(CALLBACKS) >= 8


@pytest.mark.parametrize("name", CALLBACKS)
def test_every_callback_fixture_parses(name: str) -> None:
    """Every sample callback parses, keeping its task id and status word."""
    data = fixture_json(name)
    task = parse_task(data)
    inner = data.get("data", data)
    assert task.task_id == inner.get("task_id", inner.get("id"))
    word = inner.get("task_status", inner.get("status"))
    assert task.task_status == word
    assert task.status is TaskStatus.parse(word)


@pytest.mark.parametrize("name", ["create_response.json", "query_response_succeed.json"])
def test_envelope_data_parses(name: str) -> None:
    """The task inside a create or query response parses like a callback body."""
    data = fixture_json(name)["data"]
    assert parse_task(data).task_id == data["task_id"]


def test_succeed_fixture_fields() -> None:
    """A succeeded text2video callback exposes its times, external id and one video."""
    task = parse_task(fixture_json("callback_text2video_succeed.json"))
    assert task.status is TaskStatus.succeed
    assert task.created_at == 1764043200000
    assert task.updated_at == 1764043501877
    assert task.external_task_id == "kr_01JDX3N5Q8"
    assert task.assets() == [
        AssetSpec(
            AssetKind.video,
            0,
            "https://cdn.klingai.com/bs2/upload-kling-api/7384910231/text2video/"
            "867283741759111202-0_raw_video_1.mp4",
            "867283741759111202_0",
        )
    ]


def test_unknown_fields_do_not_stop_a_task() -> None:
    """Fields Kling adds later are no reason to refuse; the raw body keeps them for the event."""
    task = parse_task(fixture_json("callback_future_fields.json"))
    assert task.status is TaskStatus.succeed
    assert [spec.url.rsplit("/", 1)[1] for spec in task.assets()] == [
        "867283741759111500-0_raw_video_1.mp4"
    ]
    nested = parse_task(task_body(task_info={"external_task_id": "e1", "new_thing": [1, 2]}))
    assert nested.external_task_id == "e1"


def test_watermarked_copies_are_separate_assets_on_request() -> None:
    """`watermark_url` names a second file of the same index, kept only when asked for."""
    task = parse_task(fixture_json("callback_future_fields.json"))
    both = task.assets(watermarked=True)
    assert [(spec.kind, spec.index, spec.variant) for spec in both] == [
        (AssetKind.video, 0, ""),
        (AssetKind.video, 0, "watermarked"),
    ]
    assert both[1].url.endswith("_wm_video_1.mp4")


def test_task_info_and_result_may_be_missing() -> None:
    """A body with only task_id and task_status parses, with no external id and no assets."""
    task = parse_task({"task_id": "abc", "task_status": "submitted"})
    assert task.external_task_id is None
    assert task.task_status_msg is None
    assert task.assets() == []


def test_numeric_task_id_becomes_a_string() -> None:
    """A task id sent as a JSON number is kept as the same digits in a string."""
    task = parse_task(json.loads('{"task_id": 867283741759111202, "task_status": "submitted"}'))
    assert task.task_id == "867283741759111202"


@pytest.mark.parametrize(
    "task_id",
    ["../../etc", "", "a" * 10_000, "..", ".", "a/b", "-1", "a b", "x\x00", "é"],
)
def test_unsafe_task_ids_are_refused(task_id: str) -> None:
    """A task id that could climb directories, is empty, too long or odd is refused."""
    message = refusal(task_body(task_id=task_id))
    assert message.startswith("The body is not a Kling task object: task_id: ")
    assert message.endswith(".")
    assert "letters, digits" in message
    assert len(message) < 300  # the sentence does not echo a 10 000-character id back


def test_longest_allowed_task_id() -> None:
    """A task id of 128 safe characters is accepted."""
    task_id = "A" + "b0_.=+-" * 18 + "z"
    assert len(task_id) == 128
    assert parse_task(task_body(task_id=task_id)).task_id == task_id
    refusal(task_body(task_id=task_id + "z"))


@pytest.mark.parametrize("task_id", [None, True, 1.5, ["1"], {"id": "1"}])
def test_task_ids_of_the_wrong_type_are_refused(task_id: Any) -> None:
    """A task id that is not a string or a whole number is refused."""
    assert refusal(task_body(task_id=task_id)).startswith("The body is not a Kling task object")


@pytest.mark.parametrize(
    ("data", "kind"),
    [([], "array"), ([task_body()], "array"), ("task", "string"), (None, "null"), (7, "number")],
)
def test_non_object_json_is_refused(data: Any, kind: str) -> None:
    """A body that is not a JSON object is refused, naming what it is instead."""
    message = refusal(data)
    assert message == f"The body must be a JSON object (the Kling task), not a JSON {kind}."


def test_missing_task_status_is_refused() -> None:
    """A body without task_status is refused, naming the field."""
    message = refusal({"task_id": "abc"})
    assert message == "The body is not a Kling task object: task_status: Field required."


def test_missing_task_id_is_refused() -> None:
    """A body without task_id is refused, naming the field."""
    assert "task_id: Field required" in refusal({"task_status": "succeed"})


def test_unknown_status_parses_without_a_status() -> None:
    """A status word the service does not know is kept as text, with no TaskStatus."""
    task = parse_task(task_body(task_status="queued_v2"))
    assert task.task_status == "queued_v2"
    assert task.status is None


def test_videos_are_numbered_by_position() -> None:
    """Videos become assets 0, 1, 2… in the order they are listed, with their ids."""
    result = {"videos": [{"id": 10 + n, "url": URL.format(n)} for n in range(3)]}
    task = parse_task(task_body(task_status="succeed", task_result=result))
    assert task.assets() == [
        AssetSpec(AssetKind.video, n, URL.format(n), str(10 + n)) for n in range(3)
    ]


def test_images_are_numbered_by_their_index() -> None:
    """Images that carry distinct indexes keep those indexes, whatever their order."""
    task = parse_task(task_body(task_status="succeed", task_result=images(2, 0, 5)))
    assert [(spec.index, spec.url) for spec in task.assets()] == [
        (2, URL.format(0)),
        (0, URL.format(1)),
        (5, URL.format(2)),
    ]
    assert {spec.kind for spec in task.assets()} == {AssetKind.image}


@pytest.mark.parametrize(
    "indexes", [(None, None), (0, None), (None, 3), (1, 1), (0, 2, 2)], ids=str
)
def test_images_without_distinct_indexes_are_numbered_by_position(
    indexes: tuple[int | None, ...],
) -> None:
    """When an index is missing or repeated, every image is numbered by its position."""
    task = parse_task(task_body(task_status="succeed", task_result=images(*indexes)))
    assert [(spec.index, spec.url) for spec in task.assets()] == [
        (n, URL.format(n)) for n in range(len(indexes))
    ]


def test_aggregator_images_without_index() -> None:
    """The aggregator sample (no task_info, no index) still names its one image."""
    task = parse_task(fixture_json("callback_images_aggregator_variant.json"))
    assert task.external_task_id is None
    assert [(spec.kind, spec.index) for spec in task.assets()] == [(AssetKind.image, 0)]


def test_videos_and_images_together() -> None:
    """A result with both videos and images names every file once."""
    result = {"videos": [{"url": URL.format("v")}]} | images(0, 1)
    task = parse_task(task_body(task_status="succeed", task_result=result))
    assert [(spec.kind, spec.index) for spec in task.assets()] == [
        (AssetKind.video, 0),
        (AssetKind.image, 0),
        (AssetKind.image, 1),
    ]
    assert task.assets()[0].remote_id is None


def test_status_ranks() -> None:
    """Statuses rank submitted < processing < succeed = failed."""
    assert TaskStatus.submitted.rank < TaskStatus.processing.rank < TaskStatus.succeed.rank
    assert TaskStatus.succeed.rank == TaskStatus.failed.rank


def test_only_succeed_and_failed_are_terminal() -> None:
    """succeed and failed are terminal; submitted and processing are not."""
    assert {status for status in TaskStatus if status.terminal} == {
        TaskStatus.succeed,
        TaskStatus.failed,
    }
