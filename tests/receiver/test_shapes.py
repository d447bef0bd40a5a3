"""Every known body shape, old, current and aggregators', becomes the same task."""

from __future__ import annotations

from typing import Any

import pytest

from receiver.models import AssetKind, PayloadError, TaskStatus
from receiver.shapes import parse_task
from tests.support import fixture_json


def kinds(body: Any, *, watermarked: bool = False) -> list[tuple[str, int, str, str | None]]:
    task = parse_task(body)
    return [
        (spec.kind.value, spec.index, spec.variant, spec.group_id)
        for spec in task.assets(watermarked=watermarked)
    ]


def test_console_test_callback_is_a_submitted_task() -> None:
    task = parse_task(fixture_json("callback_new_console_test.json"))
    assert (task.task_id, task.status, task.shape) == (
        "913827032734642185",
        TaskStatus.submitted,
        "new",
    )
    assert task.assets() == []
    assert task.created_at == 1781080778802


def test_current_outputs_become_assets_and_elements_do_not() -> None:
    """Video, two grouped images, audio as mp3 and wav, a voice preview; no element."""
    body = fixture_json("callback_new_succeeded_outputs.json")
    task = parse_task(body)
    assert task.status is TaskStatus.succeed
    assert task.external_task_id == "kr_01JDX3S3DE"
    assert kinds(body) == [
        ("video", 0, "", None),
        ("image", 0, "", "g1"),
        ("image", 1, "", "g1"),
        ("audio", 0, "mp3", None),
        ("audio", 0, "wav", None),
        ("audio", 0, "voice", None),
    ]
    assert ("video", 0, "watermarked", None) in kinds(body, watermarked=True)
    urls = [spec.url for spec in task.assets()]
    assert urls[3].endswith(".mp3") and urls[4].endswith(".wav")
    assert not any("hero.png" in url for url in urls)


@pytest.mark.parametrize("word", ["succeed", "succeeded"])
def test_both_words_for_success_are_one_state(word: str) -> None:
    assert parse_task({"id": "t1", "status": word}).status is TaskStatus.succeed
    assert parse_task({"task_id": "t1", "task_status": word}).status is TaskStatus.succeed


def test_seconds_are_read_as_milliseconds_and_noted() -> None:
    task = parse_task(fixture_json("callback_aggregator_seconds.json"))
    assert (task.created_at, task.updated_at) == (1764043200000, 1764043500000)
    assert task.shape == "old+seconds"
    assert kinds(fixture_json("callback_aggregator_seconds.json"), watermarked=True) == [
        ("video", 0, "", None)  # an empty watermark_url is none
    ]


def test_one_element_data_list_is_the_task() -> None:
    task = parse_task(fixture_json("query_aggregator_list_data.json"))
    assert (task.task_id, task.status, task.shape) == (
        "867283741759111701",
        TaskStatus.processing,
        "old+envelope",
    )


def test_unified_summary_is_one_file_of_the_kind_its_suffix_says() -> None:
    task = parse_task(fixture_json("callback_aggregator_unified.json"))
    assert (task.task_id, task.status, task.shape) == (
        "867283741759111702",
        TaskStatus.succeed,
        "unified+envelope",
    )
    assert kinds(fixture_json("callback_aggregator_unified.json")) == [("video", 0, "", None)]
    audio = {
        "code": "success",
        "data": {"id": "a1", "status": "succeeded", "url": "https://x/a.wav"},
    }
    assert kinds(audio) == [("audio", 0, "", None)]


def test_query_answers_of_the_current_standard_parse_one_by_one() -> None:
    answer = fixture_json("query_tasks_batch.json")
    tasks = [parse_task(item) for item in answer["data"]]
    assert [(t.task_id, t.status) for t in tasks] == [
        ("913827032734650001", TaskStatus.succeed),
        ("913827032734650002", TaskStatus.processing),
    ]
    listed = fixture_json("list_tasks_page.json")["data"]["result"]
    assert parse_task(listed[0]).assets()[0].kind is AssetKind.video


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"hello": 1}, "neither task_id and task_status"),
        ({"id": "t1"}, "status"),
        ({"id": "t1", "status": "succeeded", "outputs": [{"type": "video"}]}, "must have a url"),
        (
            {"id": "t1", "status": "succeeded", "outputs": [{"type": "audio"}]},
            "mp3_url or a wav_url",
        ),
        ({"code": "success", "data": {"status": "succeeded", "url": "https://x/v.mp4"}}, "an id"),
        ({"code": 0, "data": [{"id": "a", "status": "x"}, {"id": "b", "status": "x"}]}, "2 tasks"),
        ({"id": "t1", "status": "succeeded", "create_time": "soon"}, "create_time"),
    ],
)
def test_a_body_in_no_known_shape_is_refused_in_words(body: Any, words: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_task(body)
    assert words in str(caught.value)


@pytest.mark.parametrize("value", [1.5e12, 10**30, True, "1781080778802"])
def test_odd_times_are_answered_quickly(value: Any) -> None:
    """A time of any JSON type is parsed or refused at once, never scanned through."""
    try:
        parse_task({"id": "t1", "status": "processing", "create_time": value})
    except PayloadError as exc:
        assert "create_time" in str(exc)
