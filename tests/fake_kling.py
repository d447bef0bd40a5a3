"""A fake Kling API served for real on 127.0.0.1, speaking Kling's JSON shapes.

It plays both of Kling's API standards under one `base`, `http://127.0.0.1:PORT/kling` (an
aggregator-style path prefix); an action's first segment decides which (`standard`):

- old (`videos/…`, `images/…`, `audio/…`): `POST {base}/v1/{action}/{action2}` creates a
  task, `GET {base}/v1/{action}/{action2}/{id}` answers by task_id or external_task_id, and
  the task is the flat `task_id/task_status/task_result` object;
- new (`product/model`, e.g. `text-to-video/kling-2.6`): `POST {base}/{product}/{model}`
  creates a task (callback URL and external id under `options`), `GET {base}/tasks?task_ids=…`
  (or `external_task_ids=…`) answers up to 50 at once, `POST {base}/tasks` lists them page by
  page, and the task is TASK2 (`id/status/outputs/billing`).

Every request is checked for `Authorization: Bearer <key>` or a JWT signed with the secret key,
and recorded. The test moves tasks along (`advance`), and POSTs the task object to a task's
callback URL only when it asks (`send_callback`, signed per Standard Webhooks when the fake has
a `webhook_secret`), so a callback can be lost, duplicated or forged on purpose.

    with fake_kling(media, api_key="k") as kling:
        kling.fail_creates(1303, 1303)          # two refusals, then the create goes through
        ...
        kling.advance(task_id)                   # submitted -> processing
        kling.advance(task_id)                   # processing -> succeed, files on `media`
        kling.send_callback(task_id)
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl

import httpx
import jwt
from standardwebhooks.webhooks import Webhook

from tests.media_server import STARTS, MediaServer, Serve, media_bytes

PREFIX = "/kling"
TASKS = "/tasks"  # the new standard's batch query (GET) and listing (POST), under PREFIX
_CREATE = re.compile(r"/v1/([a-z0-9][a-z0-9_-]*/[a-z0-9][a-z0-9_-]*)")
_QUERY = re.compile(r"/v1/([a-z0-9][a-z0-9_-]*/[a-z0-9][a-z0-9_-]*)/([^/]+)")
_CREATE_NEW = re.compile(r"/([a-z0-9][a-z0-9_-]*/[a-z0-9][a-z0-9._-]*)")  # models hold dots
_OLD_FAMILIES = frozenset({"videos", "images", "audio"})
_NEXT = {"submitted": "processing", "processing": "succeed"}
STATUSES = ("submitted", "processing", "succeed", "failed")  # the fake's (old-standard) words
_NEW_WORDS = {"succeed": "succeeded"}  # where TASK2 says it differently
OUTPUT_KINDS = ("video", "image", "audio", "voice", "element")
_CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".png": "image/png",
    ".mp3": "audio/mpeg",
    ".wav": "audio/wav",
}
MAX_BATCH = 50  # ids per batch query
MAX_LIMIT = 500  # tasks per listing page
DEFAULT_LIMIT = 20
_MONTH_MS = 30 * 24 * 3600 * 1000  # a listing's default reach back from end_time
CONSOLE_TEST_ID = "913827032734642185"

Standard = Literal["old", "new"]

# Kling's error codes, with the HTTP status and message each comes with (KLING_API.md).
ERRORS: dict[int, tuple[int, str]] = {
    1000: (401, "Authorization failed"),
    1001: (401, "Authorization is empty"),
    1002: (401, "Authorization is invalid"),
    1003: (401, "Authorization is not yet valid"),
    1004: (401, "Authorization token has expired"),
    1102: (429, "Resource pack exhausted"),
    1103: (403, "No access to this API or model"),
    1201: (400, "duration: must be one of [5, 10]"),
    1203: (404, "Task not found"),
    1301: (400, "Content did not pass the safety check"),
    1302: (429, "Rate limit exceeded"),
    1303: (429, "parallel task over resource pack limit"),
    5000: (500, "Internal server error"),
    5001: (503, "Service under maintenance"),
}


def now_ms() -> int:
    return int(time.time() * 1000)


def standard(action: str) -> Standard:
    """Which API standard an action is made under: the old one's start videos/, images/, audio/."""
    return "old" if action.split("/", 1)[0] in _OLD_FAMILIES else "new"


def default_output(action: str) -> str:
    """The kind of file a task makes unless the test says otherwise: "video" or "image"."""
    if standard(action) == "old":
        return "image" if action.startswith("images/") else "video"
    return "video" if "video" in action.split("/", 1)[0] else "image"


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str  # without the query string
    headers: dict[str, str]  # names in lower case
    body: Any
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeTask:
    """A task as the fake Kling keeps it."""

    task_id: str
    action: str
    external_task_id: str | None = None
    callback_url: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "submitted"
    status_msg: str = ""
    created_at: int = field(default_factory=now_ms)
    updated_at: int = field(default_factory=now_ms)
    urls: list[str] = field(default_factory=list)  # every downloadable result, in output order
    outputs: list[dict[str, Any]] = field(default_factory=list)  # shown in TASK2 only
    watermark_urls: list[str] = field(default_factory=list)
    queries: int = 0

    def as_json(self) -> dict[str, Any]:
        """The flat task object of its standard, as a query answers it and a callback carries it."""
        if standard(self.action) == "new":
            return self._task2()
        data: dict[str, Any] = {
            "task_id": self.task_id,
            "task_status": self.status,
            "task_status_msg": self.status_msg,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "task_info": {},
        }
        if self.external_task_id is not None:
            data["task_info"]["external_task_id"] = self.external_task_id
        if self.status == "succeed":
            data["final_unit_deduction"] = "1"
            data["task_result"] = result(self.task_id, self.action, self.urls, self.watermark_urls)
        return data

    def _task2(self) -> dict[str, Any]:
        succeeded = self.status == "succeed"
        data: dict[str, Any] = {
            "id": self.task_id,
            "status": _NEW_WORDS.get(self.status, self.status),
            "message": self.status_msg,
            "create_time": self.created_at,
            "update_time": self.updated_at,
        }
        if self.external_task_id is not None:
            data["external_id"] = self.external_task_id
        # A copy, so that a test editing the answer into a forgery leaves the task as it is.
        data["outputs"] = copy.deepcopy(self.outputs) if succeeded else []
        if succeeded:
            data["billing"] = [{"charge_type": "generation", "amount": 1}]
        return data


def result(
    task_id: str, action: str, urls: list[str], watermark_urls: Sequence[str] = ()
) -> dict[str, Any]:
    """An old-standard task_result naming these URLs, videos or images as the action makes."""
    items: list[dict[str, Any]]
    if action.startswith("images/"):
        key, items = "images", [{"index": n, "url": url} for n, url in enumerate(urls)]
    else:
        key = "videos"
        items = [
            {"id": f"{task_id}_{n}", "url": url, "duration": "5.1"} for n, url in enumerate(urls)
        ]
    for item, mark in zip(items, watermark_urls, strict=False):
        item["watermark_url"] = mark
    return {key: items}


def webhook_headers(
    body: bytes, secrets: Sequence[str], timestamp: int | None = None
) -> dict[str, str]:
    """Standard Webhooks headers for `body`, one signature per secret (two: a key rotation)."""
    msg_id = str(uuid.uuid4().int % 10**19)  # Kling's ids are numeric strings
    seconds = int(time.time()) if timestamp is None else timestamp
    at = datetime.fromtimestamp(seconds, tz=UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(seconds),
        "webhook-signature": " ".join(Webhook(s).sign(msg_id, at, body) for s in secrets),
    }


def _ids(listed: str | None) -> list[str]:
    """The ids of a batch query's comma-separated parameter."""
    return [name.strip() for name in (listed or "").split(",") if name.strip()]


def _output(kind: str, task_id: str, n: int, url: str) -> dict[str, Any]:
    """The TASK2 output for a video or image file."""
    if kind == "video":
        return {"type": "video", "id": f"{task_id}_v{n}", "url": url, "duration": "5.1"}
    return {"type": "image", "url": url, "group_id": "g1"}  # one group: the task's images


def _status_filters(filters: Any) -> list[set[str]] | None:
    """The TASK2 status words each status filter of a listing allows; None if malformed."""
    known = {_NEW_WORDS.get(s, s) for s in STATUSES}
    wanted: list[set[str]] = []
    if not isinstance(filters, list):
        return None
    for rule in filters:
        if not (
            isinstance(rule, dict)
            and rule.get("key") in ("status", "product_type")  # product_type is accepted, unused
            and isinstance(rule.get("values"), list)
            and all(isinstance(v, str) for v in rule["values"])
        ):
            return None
        if rule["key"] == "status":
            if not set(rule["values"]) <= known:
                return None
            wanted.append(set(rule["values"]))
    return wanted


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ms(value: Any, default: int | None) -> int | None:
    """A listing's time bound: `default` when absent, None when not an integer."""
    if value is None:
        return default
    return value if _is_int(value) else None


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _offset(cursor: str) -> int | None:
    """Where an opaque listing cursor points, or None if the fake never gave it out."""
    if not cursor:
        return 0
    try:
        word, _, number = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        return int(number) if word == "offset" and number.isdigit() else None
    except ValueError:
        return None


class FakeKling:
    """A threaded HTTP server on 127.0.0.1 that plays Kling's task API."""

    def __init__(
        self,
        media: MediaServer | None = None,
        *,
        api_key: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        self.media = media
        self.api_key = api_key
        self.access_key = access_key
        self.secret_key = secret_key
        self.webhook_secret = webhook_secret  # `whsec_…`: callbacks are signed when set
        self.tasks: dict[str, FakeTask] = {}
        self.requests: list[Recorded] = []
        self.claims: list[dict[str, Any]] = []  # the decoded JWT of each authorised request
        self.files: dict[str, bytes] = {}  # result URL -> the bytes the media server serves
        self._errors: list[int] = []
        self._always: int | None = None
        self._lock = threading.Lock()
        self._ids = iter(range(867283741759111000, 10**19))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    # -- set-up ----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What KLING_API_BASE should be: the fake's address with its path prefix."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{PREFIX}"

    def fail_creates(self, *codes: int) -> None:
        """Answer the next creates with these error codes, one each, then create again."""
        with self._lock:
            self._errors += codes

    def always_fail(self, code: int | None) -> None:
        """Answer every create with this error code (None: stop)."""
        with self._lock:
            self._always = code

    def add_task(
        self,
        action: str,
        *,
        external_task_id: str | None = None,
        status: str = "submitted",
        callback_url: str | None = None,
        created_at: int | None = None,
    ) -> FakeTask:
        """A task Kling knows without having been asked through this fake's API.

        `created_at` (ms) places it in the past, for the new standard's listing.
        """
        assert status in STATUSES, f"{status!r}: the fake's statuses are {STATUSES}"
        with self._lock:
            task = FakeTask(
                self._new_id(),
                action,
                external_task_id=external_task_id,
                callback_url=callback_url,
                status=status,
            )
            if created_at is not None:
                task.created_at = task.updated_at = created_at
            self.tasks[task.task_id] = task
        return task

    def advance(
        self,
        task_id: str,
        to: str | None = None,
        *,
        urls: list[str] | None = None,
        files: int = 1,
        msg: str = "",
        outputs: Sequence[str] | None = None,
        watermarked: bool = False,
    ) -> FakeTask:
        """Move a task on one step (submitted, processing, succeed) or straight to `to`.

        A task turning `succeed` gets `urls` (as outputs of its default kind), or else new
        files on the media server: `files` of its default kind, or one output per kind named
        in `outputs` (new standard: OUTPUT_KINDS). `watermarked` adds a watermarked copy of
        each video and image.
        """
        with self._lock:
            task = self.tasks[task_id]
            status = to or _NEXT[task.status]
        assert status in STATUSES, f"{status!r}: the fake's statuses are {STATUSES}"
        assert outputs is None or standard(task.action) == "new", "outputs= is new-standard only"
        made: tuple[list[str], list[dict[str, Any]], list[str]] | None = None
        if urls is not None:
            kind = default_output(task.action)
            made = list(urls), [_output(kind, task_id, n, url) for n, url in enumerate(urls)], []
        elif status == "succeed":
            kinds = list(outputs) if outputs is not None else [default_output(task.action)] * files
            made = self._make_outputs(task_id, kinds, watermarked)
        with self._lock:
            task.status, task.status_msg = status, msg
            task.updated_at = max(now_ms(), task.updated_at + 1)
            if made is not None:
                task.urls, task.outputs, task.watermark_urls = made
        return task

    def add_file(
        self,
        stem: str,
        action: str = "videos/text2video",
        *,
        suffix: str | None = None,
        content_type: str | None = None,
    ) -> str:
        """A new file on the media server, its start that of its suffix's format; its URL.

        It ends in `suffix` (else .png or .mp4, as the action makes) and is served with
        `content_type` (else the suffix's: .mp4, .png, .mp3, .wav).
        """
        assert self.media is not None, "FakeKling needs a media server to make result files"
        suffix = suffix or (".png" if default_output(action) == "image" else ".mp4")
        path = stem + suffix
        like = suffix[1:] if suffix[1:] in STARTS else "mp4"
        body = media_bytes(5000, path, like)
        served = content_type or _CONTENT_TYPES.get(suffix, "application/octet-stream")
        url = self.media.add(path, body, [Serve(content_type=served)])
        self.files[url] = body
        return url

    def _make_outputs(
        self, task_id: str, kinds: Sequence[str], watermarked: bool
    ) -> tuple[list[str], list[dict[str, Any]], list[str]]:
        """Files for each kind of output: (every downloadable URL, the outputs, watermark URLs)."""
        urls: list[str] = []
        outputs: list[dict[str, Any]] = []
        marks: list[str] = []
        for n, kind in enumerate(kinds):
            stem = f"/kling/{task_id}/{n}"
            if kind in ("video", "image"):
                suffix = ".mp4" if kind == "video" else ".png"
                urls.append(self.add_file(stem, suffix=suffix))
                output = _output(kind, task_id, n, urls[-1])
                if watermarked:
                    marks.append(self.add_file(stem + "-watermark", suffix=suffix))
                    output["watermark_url"] = marks[-1]
            elif kind == "audio":
                urls += [self.add_file(stem, suffix=".mp3"), self.add_file(stem, suffix=".wav")]
                output = {
                    "type": "audio",
                    "id": f"{task_id}_a{n}",
                    "mp3_url": urls[-2],
                    "wav_url": urls[-1],
                    "mp3_duration": "5.0",
                    "wav_duration": "5.0",
                }
            elif kind == "voice":
                urls.append(self.add_file(stem, suffix=".mp3"))
                output = {
                    "type": "voice",
                    "id": f"{task_id}_s{n}",
                    "name": "narrator",
                    "url": urls[-1],
                    "owned_by": "user",
                    "status": "succeeded",
                }
            elif kind == "element":  # a reusable subject: a definition, no file of its own
                output = {
                    "type": "element",
                    "id": f"{task_id}_e{n}",
                    "name": "hero",
                    "description": "The story's hero, seen from the front.",
                    "element_type": "character",
                    "references": [
                        {"type": "image", "role": "front", "url": "https://example.invalid/ref.png"}
                    ],
                    "owned_by": "user",
                    "status": "succeeded",
                    "tags": [],
                }
            else:
                raise AssertionError(f"{kind!r}: outputs are among {OUTPUT_KINDS}")
            outputs.append(output)
        return urls, outputs, marks

    # -- what the test sees ------------------------------------------------------

    def task(self, task_id: str) -> FakeTask:
        with self._lock:
            return self.tasks[task_id]

    def by_external(self, external_task_id: str) -> FakeTask:
        with self._lock:
            (task,) = [t for t in self.tasks.values() if t.external_task_id == external_task_id]
            return task

    def creates(self, external_task_id: str | None = None) -> list[Recorded]:
        """Every create request (for one external_task_id), answered with a task or refused."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == "POST"
                and r.path != PREFIX + TASKS
                and (external_task_id is None or _external_of(r) == external_task_id)
            ]

    def queries(self, task_id: str | None = None) -> list[Recorded]:
        """Every query, of one task or a batch (for one task: naming its task_id or external id)."""
        with self._lock:
            if task_id is None:
                return [r for r in self.requests if r.method == "GET"]
            task = self.tasks.get(task_id)
            external = task.external_task_id if task else None
            return [r for r in self.requests if r.method == "GET" and _names(r, task_id, external)]

    def batch_queries(self) -> list[Recorded]:
        """Every new-standard query, `GET /tasks?…`."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path == PREFIX + TASKS]

    def listings(self) -> list[Recorded]:
        """Every new-standard listing, `POST /tasks`."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path == PREFIX + TASKS]

    def send_callback(
        self,
        task_id: str,
        body: dict[str, Any] | None = None,
        *,
        secrets: Sequence[str] | None = None,
        timestamp: int | None = None,
    ) -> int | None:
        """POST the task (or `body`) to its callback URL now; the status, or None if unreachable.

        It is signed with `secrets` when given (two: a key rotation; none: unsigned), else with
        the fake's webhook secret if it has one; `timestamp` (s) dates the signature otherwise
        than now.
        """
        task = self.task(task_id)
        assert task.callback_url is not None, f"task {task_id} has no callback_url"
        payload = task.as_json() if body is None else body
        return self._post(task.callback_url, payload, secrets, timestamp)

    def console_test(self, url: str) -> int | None:
        """POST the body of the console's "send test callback" button to `url`, as Kling does."""
        at = now_ms()
        body = {
            "id": CONSOLE_TEST_ID,
            "status": "submitted",
            "outputs": [],
            "message": "",
            "create_time": at,
            "update_time": at,
        }
        return self._post(url, body, None, None)

    def _post(
        self,
        url: str,
        payload: dict[str, Any],
        secrets: Sequence[str] | None,
        timestamp: int | None,
    ) -> int | None:
        raw = json.dumps(payload).encode()
        headers = {"content-type": "application/json", "user-agent": "fake-kling"}
        if secrets is None:
            secrets = [self.webhook_secret] if self.webhook_secret else []
        if secrets:
            headers |= webhook_headers(raw, secrets, timestamp)
        try:
            response = httpx.post(url, content=raw, headers=headers, timeout=5, trust_env=False)
        except httpx.TransportError:
            return None
        return response.status_code

    # -- serving -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _new_id(self) -> str:
        return str(next(self._ids))

    def _refusal(self, authorization: str) -> int | None:
        """Kling's code for a request without valid credentials, or None."""
        scheme, _, credential = authorization.partition(" ")
        if scheme != "Bearer" or not credential:
            return 1001
        if self.api_key is not None and credential == self.api_key:
            return None
        if self.secret_key is None:
            return 1002
        try:
            claims = jwt.decode(
                credential,
                self.secret_key,
                algorithms=["HS256"],
                issuer=self.access_key,
                options={"require": ["iss", "exp", "nbf"]},
            )
        except jwt.ExpiredSignatureError:
            return 1004
        except jwt.ImmatureSignatureError:
            return 1003
        except jwt.PyJWTError:
            return 1002
        self.claims.append(claims)
        return None

    def _planned_refusal(self) -> tuple[int, dict[str, Any]] | None:
        """The error the test asked creates to get (`fail_creates`, `always_fail`), if any."""
        if self._errors:
            return _error(self._errors.pop(0))
        if self._always is not None:
            return _error(self._always)
        return None

    def _taken(self, external: Any) -> bool:
        return external is not None and any(
            t.external_task_id == external for t in self.tasks.values()
        )

    def _create(self, action: str, body: Any) -> tuple[int, dict[str, Any]]:
        """An old-standard create: the callback URL and external id sit at the top."""
        refused = self._create_refusal(body)
        if refused is None and self._taken(body.get("external_task_id")):
            refused = _error(1201, "external_task_id already exists")
        if refused is not None:
            return refused
        task = self._store(action, body, body)
        data = task.as_json()
        del data["task_status_msg"]
        return 200, _ok(data)

    def _create_new(self, action: str, body: Any) -> tuple[int, dict[str, Any]]:
        """A new-standard create: the callback URL and external id sit under `options`."""
        if refused := self._create_refusal(body):
            return refused
        for misplaced in ("callback_url", "external_task_id"):
            if misplaced in body:
                return _error(1201, f"{misplaced} belongs under options")
        options, settings = body.get("options", {}), body.get("settings", {})
        if not isinstance(options, dict) or not isinstance(settings, dict):
            return _error(1201, "options and settings must be JSON objects")
        if "duration" in settings and not _is_int(settings["duration"]):
            return _error(1201, "settings.duration must be an integer")
        if self._taken(options.get("external_task_id")):
            return _error(1201, "external_task_id already exists")
        task = self._store(action, {k: v for k, v in body.items() if k != "options"}, options)
        data = {
            "id": task.task_id,
            "status": task.status,
            "create_time": task.created_at,
            "update_time": task.updated_at,
        }
        if task.external_task_id is not None:
            data["external_id"] = task.external_task_id
        return 200, _ok(data)

    def _create_refusal(self, body: Any) -> tuple[int, dict[str, Any]] | None:
        """A planned error, or one for a body that is no JSON object; None to go on."""
        if refused := self._planned_refusal():
            return refused
        if not isinstance(body, dict):
            return _error(1201, "the body must be a JSON object")
        return None

    def _store(self, action: str, params: dict[str, Any], ours: dict[str, Any]) -> FakeTask:
        """A new task from a create; `ours` holds its callback_url and external_task_id."""
        task = FakeTask(
            self._new_id(),
            action,
            external_task_id=ours.get("external_task_id"),
            callback_url=ours.get("callback_url"),
            params={
                k: v for k, v in params.items() if k not in ("callback_url", "external_task_id")
            },
        )
        self.tasks[task.task_id] = task
        return task

    def _query(self, action: str, name: str) -> tuple[int, dict[str, Any]]:
        found = self.tasks.get(name) or next(
            (t for t in self.tasks.values() if t.external_task_id == name), None
        )
        if found is None or found.action != action:
            return _error(1203)
        found.queries += 1
        return 200, _ok(found.as_json())

    def _batch_query(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The new-standard tasks a `GET /tasks` names; unknown ids are left out."""
        given = [key for key in ("task_ids", "external_task_ids") if key in query]
        if len(given) != 1:
            return _error(1201, "give exactly one of task_ids and external_task_ids")
        (key,) = given
        names = _ids(query[key])
        if not names:
            return _error(1201, f"{key} names no task")
        if len(names) > MAX_BATCH:
            return _error(1201, f"{key}: at most {MAX_BATCH} ids per query, got {len(names)}")
        tasks = [t for t in self.tasks.values() if standard(t.action) == "new"]
        if key == "task_ids":
            known = {t.task_id: t for t in tasks}
        else:
            known = {t.external_task_id: t for t in tasks if t.external_task_id is not None}
        found = [known[name] for name in dict.fromkeys(names) if name in known]
        for task in found:
            task.queries += 1
        return 200, _ok([task.as_json() for task in found])

    def _list(self, body: Any) -> tuple[int, dict[str, Any]]:
        """A page of the new-standard tasks created in [start_time, end_time], oldest first."""
        body = {} if body is None else body
        if not isinstance(body, dict):
            return _error(1201, "the body must be a JSON object")
        end = _ms(body.get("end_time"), now_ms())
        start = _ms(body.get("start_time"), None if end is None else end - _MONTH_MS)
        if start is None or end is None:
            return _error(1201, "start_time and end_time must be integers (ms)")
        limit = body.get("limit", DEFAULT_LIMIT)
        if not (_is_int(limit) and 1 <= limit <= MAX_LIMIT):
            return _error(1201, f"limit must be an integer from 1 to {MAX_LIMIT}")
        cursor = body.get("cursor")
        cursor = "" if cursor is None else cursor
        offset = _offset(cursor) if isinstance(cursor, str) else None
        if offset is None:
            return _error(1201, "cursor is not one this API gave")
        filters = body.get("filters")
        wanted = _status_filters([] if filters is None else filters)
        if wanted is None:
            return _error(1201, "filters are [{key: status | product_type, values: [str]}]")
        matching = sorted(
            (
                t
                for t in self.tasks.values()
                if standard(t.action) == "new"
                and start <= t.created_at <= end
                and all(_NEW_WORDS.get(t.status, t.status) in words for words in wanted)
            ),
            key=lambda t: t.created_at,
        )
        page = matching[offset : offset + limit]
        more = offset + limit < len(matching)
        return 200, _ok(
            {
                "result": [t.as_json() for t in page],
                "next_cursor": _cursor(offset + limit) if more else "",
                "count": len(matching),
            }
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                path, _, query_string = self.path.partition("?")
                query = dict(parse_qsl(query_string, keep_blank_values=True))
                with fake._lock:
                    headers = {name.lower(): value for name, value in self.headers.items()}
                    fake.requests.append(Recorded(method, path, headers, body, query))
                    status, answer = self._answer(method, path, query, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _answer(
                self, method: str, path: str, query: dict[str, str], body: Any
            ) -> tuple[int, dict[str, Any]]:
                if not path.startswith(PREFIX + "/"):
                    return _error(1203, f"no such path {path}")
                refused = fake._refusal(self.headers.get("Authorization", ""))
                if refused is not None:
                    return _error(refused)
                route = path[len(PREFIX) :]
                if route == TASKS and method == "GET":
                    return fake._batch_query(query)
                if route == TASKS and method == "POST":
                    return fake._list(body)
                if (
                    method == "POST"
                    and (match := _CREATE.fullmatch(route))
                    and standard(match[1]) == "old"
                ):
                    return fake._create(match[1], body)
                if (
                    method == "GET"
                    and (match := _QUERY.fullmatch(route))
                    and standard(match[1]) == "old"
                ):
                    return fake._query(match[1], match[2])
                if (
                    method == "POST"
                    and not route.startswith("/v1/")
                    and (match := _CREATE_NEW.fullmatch(route))
                    and standard(match[1]) == "new"
                ):
                    return fake._create_new(match[1], body)
                return _error(1202, f"{method} {path} is not an API")

        return Handler


def _external_of(create: Recorded) -> Any:
    """The external id a create asked for: top level (old standard) or under `options` (new)."""
    if not isinstance(create.body, dict):
        return None
    if create.path.startswith(PREFIX + "/v1/"):
        return create.body.get("external_task_id")
    options = create.body.get("options")
    return options.get("external_task_id") if isinstance(options, dict) else None


def _names(query: Recorded, task_id: str, external: str | None) -> bool:
    """Whether a query asked about this task, by its task_id or its external id."""
    if query.path == PREFIX + TASKS:
        return task_id in _ids(query.query.get("task_ids")) or (
            external is not None and external in _ids(query.query.get("external_task_ids"))
        )
    return query.path.rsplit("/", 1)[-1] in (task_id, external)


def _ok(data: Any) -> dict[str, Any]:
    """Kling's envelope around a successful answer."""
    return {"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data}


def _error(code: int, message: str | None = None) -> tuple[int, dict[str, Any]]:
    status, default = ERRORS.get(code, (404 if code == 1202 else 400, "Request refused"))
    return status, {"code": code, "message": message or default, "request_id": str(uuid.uuid4())}


@contextmanager
def fake_kling(
    media: MediaServer | None = None,
    *,
    api_key: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    webhook_secret: str | None = None,
) -> Iterator[FakeKling]:
    """A started fake Kling API, stopped on exit."""
    fake = FakeKling(
        media,
        api_key=api_key,
        access_key=access_key,
        secret_key=secret_key,
        webhook_secret=webhook_secret,
    )
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
