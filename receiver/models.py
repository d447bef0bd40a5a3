"""Payload and record types, and the order in which a task's status may move.

Nothing here does I/O. The Kling task object is parsed leniently: unknown
fields are kept (the raw body is stored verbatim anyway), optional fields may
be missing, and only what the service acts on is checked strictly.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

__all__ = [
    "ACTION_PATTERN",
    "TASK_ID_PATTERN",
    "AssetKind",
    "AssetRecord",
    "AssetSpec",
    "AssetState",
    "CallbackRef",
    "EventRecord",
    "KlingTask",
    "PayloadError",
    "Source",
    "TaskRecord",
    "TaskStatus",
    "parse_task",
]

# Opaque Kling ids (numeric or base64-like); starting with an alphanumeric rules out "." and "..".
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}")
# An `action/action2` pair such as `videos/text2video` or `images/kolors-virtual-try-on`.
ACTION_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}/[a-z0-9][a-z0-9_-]{0,63}")


class TaskStatus(enum.StrEnum):
    """Where a Kling task stands; the value is Kling's own word."""

    submitted = "submitted"  # accepted by Kling, waiting for a slot
    processing = "processing"  # being generated
    succeed = "succeed"  # finished; task_result carries the files (terminal)
    failed = "failed"  # finished without a result (terminal)

    @property
    def rank(self) -> int:
        """Position in the forward-only order; both terminal states share the top rank."""
        return _RANK[self]

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.succeed, TaskStatus.failed)


_RANK = {
    TaskStatus.submitted: 0,
    TaskStatus.processing: 1,
    TaskStatus.succeed: 2,
    TaskStatus.failed: 2,
}


class AssetKind(enum.StrEnum):
    """What an archived file is."""

    video = "video"  # an entry of task_result.videos
    image = "image"  # an entry of task_result.images


class AssetState(enum.StrEnum):
    """Where an asset's download stands."""

    pending = "pending"  # queued, waiting for a worker
    downloading = "downloading"  # leased by a worker
    stored = "stored"  # complete and verified in storage
    failed = "failed"  # given up on; the error says why


class Source(enum.StrEnum):
    """What brought an update to the ledger."""

    callback = "callback"  # POSTed by Kling to the callback URL
    poll = "poll"  # fetched by the poller's query
    submit = "submit"  # the answer to our own create request
    track = "track"  # a manual adoption of a task submitted elsewhere


class PayloadError(ValueError):
    """A delivery's body is not a Kling task object; `str()` is a sentence for the sender."""


def _unicode(value: str) -> str:
    """Refuse text the database cannot keep: JSON escapes can spell lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be Unicode text (it holds a lone surrogate escape)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
"""A string the ledger stores as it is."""

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
"""An integer the ledger can store (SQLite's INTEGER is 64-bit)."""


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class _Video(_Lenient):
    id: Text | Int64 | None = None
    url: Text = Field(min_length=1, max_length=4096)
    duration: str | float | int | None = None
    watermark_url: str | None = None


class _Image(_Lenient):
    index: int | None = Field(default=None, ge=0, le=10_000)
    url: Text = Field(min_length=1, max_length=4096)
    watermark_url: str | None = None


class _TaskResult(_Lenient):
    videos: list[_Video] | None = None
    images: list[_Image] | None = None


class _TaskInfo(_Lenient):
    external_task_id: Text | None = None


class KlingTask(_Lenient):
    """The flat task object Kling sends to a callback URL and returns from a query."""

    task_id: str
    task_status: Text = Field(min_length=1, max_length=64)
    task_status_msg: Text | None = None
    created_at: Int64 | None = None
    updated_at: Int64 | None = None
    task_info: _TaskInfo | None = None
    task_result: _TaskResult | None = None

    @field_validator("task_id", mode="before")
    @classmethod
    def _task_id(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # numeric ids sometimes arrive as JSON numbers
        if isinstance(value, str) and not TASK_ID_PATTERN.fullmatch(value):
            raise ValueError(
                "must be 1 to 128 letters, digits or _.=+- characters, "
                "starting with a letter or digit"
            )
        return value

    @property
    def status(self) -> TaskStatus | None:
        """The status if it is one the service knows, else None."""
        try:
            return TaskStatus(self.task_status)
        except ValueError:
            return None

    @property
    def external_task_id(self) -> str | None:
        return self.task_info.external_task_id if self.task_info else None

    def assets(self) -> list[AssetSpec]:
        """One entry per file in task_result: videos by position, images by their index."""
        result = self.task_result
        if result is None:
            return []
        specs = [
            AssetSpec(
                AssetKind.video, position, video.url, None if video.id is None else str(video.id)
            )
            for position, video in enumerate(result.videos or [])
        ]
        images = result.images or []
        indexes = [image.index for image in images]
        if None in indexes or len(set(indexes)) != len(indexes):
            indexes = list(range(len(images)))  # aggregators may drop or repeat `index`
        specs += [
            AssetSpec(AssetKind.image, index, image.url, None)
            for index, image in zip(indexes, images, strict=True)
            if index is not None
        ]
        return specs


@dataclass(frozen=True, slots=True)
class CallbackRef:
    """What a verified callback URL names (see `receiver.tokens`)."""

    ref: str
    action: str | None

    @property
    def external_task_id(self) -> str | None:
        """The one task this URL was made for, or None for a shared hand-made URL."""
        return self.ref[2:] if self.ref.startswith("x-") else None


@dataclass(frozen=True, slots=True)
class AssetSpec:
    """A file named by a succeeded task, before it has a row of its own."""

    kind: AssetKind
    index: int
    url: str
    remote_id: str | None


def parse_task(data: Any) -> KlingTask:
    """Validate decoded JSON as a Kling task object, or raise `PayloadError`."""
    if not isinstance(data, dict):
        kind = _json_type(data)
        raise PayloadError(f"The body must be a JSON object (the Kling task), not a JSON {kind}.")
    try:
        return KlingTask.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(part) for part in error["loc"]) or "body"
            problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        summary = "; ".join(problems)
        raise PayloadError(f"The body is not a Kling task object: {summary}.") from exc


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


@dataclass(frozen=True, slots=True)
class AssetRecord:
    """An asset as the ledger keeps it."""

    kind: AssetKind
    index: int
    url: str
    state: AssetState
    location: str | None
    sha256: str | None
    size: int | None
    content_type: str | None
    attempts: int
    error: str | None
    stored_at: str | None


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task's current state as the ledger keeps it."""

    task_id: str
    action: str | None
    status: TaskStatus | None
    status_msg: str | None
    external_task_id: str | None
    created_at: str
    updated_at: str
    kling_updated_at: int | None
    terminal_source: Source | None
    updates: int
    polls: int
    flag: str | None
    archived_at: str | None
    assets: tuple[AssetRecord, ...]

    @property
    def archived(self) -> bool:
        return self.archived_at is not None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One distinct delivery, kept verbatim."""

    id: int
    task_id: str
    source: Source
    status: str
    body: bytes
    headers: dict[str, str]
    remote: str | None
    received_at: str
    last_received_at: str
    times_received: int
    applied: bool
