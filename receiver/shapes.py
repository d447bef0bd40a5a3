"""Every body shape Kling (or an aggregator) reports a task in, read into one `KlingTask`.

The shapes, each named in the `shape` the event keeps:

- ``old``: the v1 standard's flat task (`task_id`, `task_status`, `task_result` with
  `videos` and `images`), as a callback body and as a query's `data`;
- ``new``: the current standard's task (`id`, `status`, typed `outputs`);
- ``unified``: an aggregator's one-file summary (`task_id` or `id`, `status`, `url`).

Any of them may come inside the `{code, message, data}` envelope, with `data` an object
or a one-element list (``+envelope``), and with times in seconds rather than
milliseconds (``+seconds``). Parsing is lenient: fields Kling adds later are ignored
here (the raw body is stored verbatim), optional ones may be missing, and only what the
service acts on is checked strictly.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from receiver.models import (
    TASK_ID_PATTERN,
    WATERMARKED,
    AssetKind,
    AssetSpec,
    KlingTask,
    PayloadError,
)

__all__ = ["kind_by_suffix", "parse_task"]

# Times in this range are seconds since 1970 (2001 to 5138); as ms they would fall in 1970-73.
_SECONDS_FROM, _SECONDS_TO = 10**9, 10**11
_AUDIO_SUFFIXES = (".mp3", ".wav", ".m4a", ".aac", ".flac", ".ogg")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


def _unicode(value: str) -> str:
    """Refuse text the database cannot keep: JSON escapes can spell lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be Unicode text (it holds a lone surrogate escape)") from None
    return value


def _task_id(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # numeric ids sometimes arrive as JSON numbers
    if isinstance(value, str) and not TASK_ID_PATTERN.fullmatch(value):
        raise ValueError(
            "must be 1 to 128 letters, digits or _.=+- characters, starting with a letter or digit"
        )
    return value


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value


Text = Annotated[str, AfterValidator(_unicode)]
"""A string the ledger stores as it is."""

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
"""An integer the ledger can store (SQLite's INTEGER is 64-bit)."""

TaskId = Annotated[str, BeforeValidator(_task_id)]
Url = Annotated[Text, Field(min_length=1, max_length=4096)]
OptionalUrl = Annotated[Url | None, BeforeValidator(_blank_is_none)]
"""A URL that aggregators may send empty for "none"."""
RemoteId = Annotated[Text | Int64 | None, BeforeValidator(_blank_is_none)]
Status = Annotated[Text, Field(min_length=1, max_length=64)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


# -- the v1 standard -------------------------------------------------------------------


class _Video(_Lenient):
    id: RemoteId = None
    url: Url
    watermark_url: OptionalUrl = None


class _Image(_Lenient):
    index: int | None = Field(default=None, ge=0, le=10_000)
    url: Url
    watermark_url: OptionalUrl = None


class _TaskResult(_Lenient):
    videos: list[_Video] | None = None
    images: list[_Image] | None = None


class _TaskInfo(_Lenient):
    external_task_id: Text | None = None


class _OldTask(_Lenient):
    task_id: TaskId
    task_status: Status
    task_status_msg: Text | None = None
    created_at: Int64 | None = None
    updated_at: Int64 | None = None
    task_info: _TaskInfo | None = None
    task_result: _TaskResult | None = None

    def files(self) -> list[AssetSpec]:
        """Videos by position, images by their index (by position when indexes are unusable)."""
        result = self.task_result
        if result is None:
            return []
        specs = []
        for position, video in enumerate(result.videos or []):
            remote_id = None if video.id is None else str(video.id)
            specs.append(AssetSpec(AssetKind.video, position, video.url, remote_id))
            if video.watermark_url:
                specs.append(
                    AssetSpec(
                        AssetKind.video, position, video.watermark_url, remote_id, WATERMARKED
                    )
                )
        images = result.images or []
        indexes = [image.index for image in images]
        if None in indexes or len(set(indexes)) != len(indexes):
            indexes = list(range(len(images)))  # aggregators may drop or repeat `index`
        for index, image in zip(indexes, images, strict=True):
            assert index is not None
            specs.append(AssetSpec(AssetKind.image, index, image.url, None))
            if image.watermark_url:
                specs.append(
                    AssetSpec(AssetKind.image, index, image.watermark_url, None, WATERMARKED)
                )
        return specs


# -- the current standard --------------------------------------------------------------


class _Output(_Lenient):
    """One entry of `outputs`; `element` and unknown types name no file of ours."""

    type: Text
    id: RemoteId = None
    url: OptionalUrl = None
    watermark_url: OptionalUrl = None
    group_id: RemoteId = None
    mp3_url: OptionalUrl = None
    wav_url: OptionalUrl = None

    @model_validator(mode="after")
    def _has_its_file(self) -> _Output:
        if self.type in ("video", "image", "voice") and self.url is None:
            raise ValueError(f"a {self.type} output must have a url")
        if self.type == "audio" and self.mp3_url is None and self.wav_url is None:
            raise ValueError("an audio output must have an mp3_url or a wav_url")
        return self


class _NewTask(_Lenient):
    id: TaskId
    status: Status
    message: Text | None = None
    create_time: Int64 | None = None
    update_time: Int64 | None = None
    external_id: Text | None = None
    outputs: list[_Output] | None = None

    def files(self) -> list[AssetSpec]:
        """Each output's files, numbered by position among the outputs of its type."""
        specs: list[AssetSpec] = []
        seen: dict[str, int] = {}
        for output in self.outputs or []:
            position = seen[output.type] = seen.get(output.type, -1) + 1
            remote_id = None if output.id is None else str(output.id)
            group = None if output.group_id is None else str(output.group_id)
            if output.type in ("video", "image"):
                kind = AssetKind(output.type)
                assert output.url is not None
                specs.append(AssetSpec(kind, position, output.url, remote_id, group_id=group))
                if output.watermark_url:
                    specs.append(
                        AssetSpec(
                            kind, position, output.watermark_url, remote_id, WATERMARKED, group
                        )
                    )
            elif output.type == "audio":
                for variant, url in (("mp3", output.mp3_url), ("wav", output.wav_url)):
                    if url:
                        specs.append(AssetSpec(AssetKind.audio, position, url, remote_id, variant))
            elif output.type == "voice":
                assert output.url is not None
                specs.append(AssetSpec(AssetKind.audio, position, output.url, remote_id, "voice"))
        return specs


# -- aggregators' one-file summary -----------------------------------------------------


class _UnifiedTask(_Lenient):
    task_id: TaskId | None = None
    id: TaskId | None = None
    status: Status
    url: OptionalUrl = None
    message: Text | None = None

    @model_validator(mode="after")
    def _has_an_id(self) -> _UnifiedTask:
        if self.task_id is None and self.id is None:
            raise ValueError("a task_id or an id is required")
        return self

    def files(self) -> list[AssetSpec]:
        """The one file, of the kind its URL's suffix suggests (a video when it says nothing)."""
        if self.url is None:
            return []
        return [AssetSpec(kind_by_suffix(self.url), 0, self.url, None)]


def kind_by_suffix(url: str) -> AssetKind:
    """The kind of file a URL names, by its path's suffix (a video when it says nothing)."""
    path = urlsplit(url).path.lower()
    if path.endswith(_IMAGE_SUFFIXES):
        return AssetKind.image
    return AssetKind.audio if path.endswith(_AUDIO_SUFFIXES) else AssetKind.video


def parse_task(data: Any) -> KlingTask:
    """Read decoded JSON in any known shape as a task, or raise `PayloadError` saying why not."""
    tags = []
    if isinstance(data, dict) and "data" in data and "code" in data:
        data = data["data"]
        if isinstance(data, list):
            if len(data) != 1:
                raise PayloadError(
                    f"The body's data holds {len(data)} tasks; a delivery reports exactly one."
                )
            data = data[0]
        tags.append("envelope")
    if not isinstance(data, dict):
        kind = _json_type(data)
        raise PayloadError(f"The body must be a JSON object (the Kling task), not a JSON {kind}.")
    try:
        task = _read(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(part) for part in error["loc"]) or "body"
            problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        summary = "; ".join(problems)
        raise PayloadError(f"The body is not a Kling task object: {summary}.") from exc
    if (task.created_at, task.updated_at) != (_ms(task.created_at), _ms(task.updated_at)):
        task = replace(task, created_at=_ms(task.created_at), updated_at=_ms(task.updated_at))
        tags.append("seconds")
    return replace(task, shape="+".join([task.shape, *tags])) if tags else task


def _read(data: dict[str, Any]) -> KlingTask:
    """The task in the one shape whose marks the body carries."""
    if "task_status" in data or ("task_id" in data and "status" not in data):
        old = _OldTask.model_validate(data)
        return KlingTask(
            task_id=old.task_id,
            task_status=old.task_status,
            task_status_msg=old.task_status_msg,
            created_at=old.created_at,
            updated_at=old.updated_at,
            external_task_id=old.task_info.external_task_id if old.task_info else None,
            files=tuple(old.files()),
            shape="old",
        )
    if "status" in data and ("url" in data or "id" not in data):
        unified = _UnifiedTask.model_validate(data)
        task_id = unified.task_id or unified.id
        assert task_id is not None
        return KlingTask(
            task_id=task_id,
            task_status=unified.status,
            task_status_msg=unified.message,
            files=tuple(unified.files()),
            shape="unified",
        )
    if "id" in data or "status" in data or "outputs" in data:
        new = _NewTask.model_validate(data)
        return KlingTask(
            task_id=new.id,
            task_status=new.status,
            task_status_msg=new.message,
            created_at=new.create_time,
            updated_at=new.update_time,
            external_task_id=new.external_id,
            files=tuple(new.files()),
            shape="new",
        )
    raise PayloadError(
        "The body is not a Kling task object: it has neither task_id and task_status "
        "(Kling's v1 standard) nor id and status (its current standard)."
    )


def _ms(value: int | None) -> int | None:
    # Compared, not tested with `in range(...)`: a range scans element by
    # element for anything that is not exactly an int.
    if value is not None and _SECONDS_FROM <= value < _SECONDS_TO:
        return value * 1000
    return value


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
