"""Record types, and the order in which a task's status may move.

Nothing here does I/O. What Kling sends is read into these types by
`receiver.shapes`, whatever shape the body had.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = [
    "ACTION_PATTERN",
    "TASK_ID_PATTERN",
    "WATERMARKED",
    "AssetKind",
    "AssetRecord",
    "AssetSpec",
    "AssetState",
    "CallbackRef",
    "EventRecord",
    "KlingTask",
    "PayloadError",
    "Source",
    "Standard",
    "TaskRecord",
    "TaskStatus",
]

# Opaque Kling ids (numeric or base64-like); starting with an alphanumeric rules out "." and "..".
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,127}")
# What a task is made by: an `action/action2` pair of the v1 standard (`videos/text2video`,
# `images/kolors-virtual-try-on`) or a `product/model` path of the current one
# (`text-to-video/kling-2.6`), whose model names may hold dots.
ACTION_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}/[a-z0-9][a-z0-9_.-]{0,63}")
# The first parts of the v1 standard's paths (`/v1/videos/…`); any other is a product.
_V1_FAMILIES = frozenset({"videos", "images", "audio"})


class Standard(enum.StrEnum):
    """Which of Kling's two API standards a task was made under."""

    old = "old"  # `POST /v1/{action}/{action2}`, queried one task at a time
    new = "new"  # `POST /{product}/{model}`, queried in batches at `/tasks`

    @classmethod
    def of(cls, action: str) -> Standard:
        """The standard of an action: the v1 one's start with videos/, images/ or audio/."""
        return cls.old if action.split("/", 1)[0] in _V1_FAMILIES else cls.new


class TaskStatus(enum.StrEnum):
    """Where a Kling task stands; the value is Kling's own word."""

    submitted = "submitted"  # accepted by Kling, waiting for a slot
    processing = "processing"  # being generated
    succeed = "succeed"  # finished; task_result carries the files (terminal)
    failed = "failed"  # finished without a result (terminal)

    @classmethod
    def parse(cls, word: str) -> TaskStatus | None:
        """The status a word names in either API standard (`succeeded` is `succeed`), or None."""
        try:
            return cls(_ALIASES.get(word, word))
        except ValueError:
            return None

    @property
    def rank(self) -> int:
        """Position in the forward-only order; both terminal states share the top rank."""
        return _RANK[self]

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.succeed, TaskStatus.failed)


# The current API standard's words for the same states.
_ALIASES = {"succeeded": "succeed"}
_RANK = {
    TaskStatus.submitted: 0,
    TaskStatus.processing: 1,
    TaskStatus.succeed: 2,
    TaskStatus.failed: 2,
}


class AssetKind(enum.StrEnum):
    """What an archived file is."""

    video = "video"  # task_result.videos, or a `video` output
    image = "image"  # task_result.images, or an `image` output
    audio = "audio"  # an `audio` output (mp3 and wav), or a `voice` output's preview


WATERMARKED = "watermarked"
"""The variant of a video or image that is the watermarked copy (`watermark_url`)."""


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
    sweep = "sweep"  # found in the account's task listing, unknown until then


class PayloadError(ValueError):
    """A delivery's body is not a Kling task object; `str()` is a sentence for the sender."""


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
    """A file named by a succeeded task, before it has a row of its own.

    `kind` and `index` say which output it is; `variant` tells apart the files of one
    output (`mp3` and `wav` of an audio, the `watermarked` copy of a video or image).
    """

    kind: AssetKind
    index: int
    url: str
    remote_id: str | None
    variant: str = ""
    group_id: str | None = None


@dataclass(frozen=True, slots=True)
class KlingTask:
    """A task as Kling reported it, whatever the body's shape (`receiver.shapes` reads them).

    Times are milliseconds since 1970; `task_status` is Kling's own word, as it came.
    """

    task_id: str
    task_status: str
    task_status_msg: str | None = None
    created_at: int | None = None
    updated_at: int | None = None
    external_task_id: str | None = None
    files: tuple[AssetSpec, ...] = ()
    shape: str = "old"

    @property
    def status(self) -> TaskStatus | None:
        """The status if it is one the service knows, else None."""
        return TaskStatus.parse(self.task_status)

    def assets(self, *, watermarked: bool = False) -> list[AssetSpec]:
        """The files to archive: every output's, and their watermarked copies if asked."""
        return [f for f in self.files if watermarked or f.variant != WATERMARKED]


@dataclass(frozen=True, slots=True)
class AssetRecord:
    """An asset as the ledger keeps it."""

    kind: AssetKind
    index: int
    variant: str
    group_id: str | None
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
    shape: str | None  # which body shape it came in (`receiver.shapes`); None before v4
