"""The Kling HTTP client: create, query and list tasks of either API standard.

Works against Kling's own API and against aggregators: `KLING_API_BASE` may
carry a path prefix (`https://host/kling`). Old-standard actions
(`videos/text2video`) live at `v1/{action}[/{id}]` under it, one task per query;
current ones (`text-to-video/kling-2.6`) are created at `{action}` and queried
in batches at `tasks?task_ids=…`, and `POST tasks` lists the account's tasks.
Auth is an API key sent as Bearer, or an access/secret key pair turned into a
short-lived HS256 JWT (refreshed before it expires).

Exceptions::

    KlingError
    ├── KlingUnavailable   no usable answer (connection, timeout, not JSON)
    └── KlingAPIError      Kling answered with an error code (code, message, request_id)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import jwt

from receiver.models import ACTION_PATTERN, TASK_ID_PATTERN, Standard
from receiver.settings import Settings

__all__ = [
    "Backoff",
    "KlingAPIError",
    "KlingClient",
    "KlingError",
    "KlingUnavailable",
    "Page",
    "Reply",
    "client_for",
]

BATCH_IDS = 50  # ids per `GET tasks` request, Kling's limit
BATCH_URL_CHARS = 2000  # and fewer when the query string would grow longer than this
LIST_LIMIT = 500  # tasks per listing page, Kling's limit
JWT_LIFETIME = 1800  # seconds, as Kling's own examples use
_REFRESH_MARGIN = 300  # a token is replaced this long before it expires


class KlingError(Exception):
    """Root of the Kling client's errors."""

    retryable = False


class KlingUnavailable(KlingError):
    """Kling gave no usable answer; whether a create went through is unknown."""

    retryable = True


class KlingAPIError(KlingError):
    """Kling refused the request with one of its error codes."""

    def __init__(self, code: int, message: str, request_id: str | None, http_status: int) -> None:
        super().__init__(f"Kling error {code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.http_status = http_status

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        """Rate limits (1302), concurrency (1303) and Kling's own trouble (5xxx, HTTP 5xx) pass."""
        return self.code in (1302, 1303) or 5000 <= self.code <= 5999 or self.http_status >= 500

    @property
    def maybe_done(self) -> bool:
        """Kling's own trouble (5xxx, HTTP 5xx): a create may have gone through regardless."""
        return 5000 <= self.code <= 5999 or self.http_status >= 500

    @property
    def not_found(self) -> bool:
        return self.http_status == 404 or self.code in (1202, 1203)


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer: the task object and Kling's request id."""

    data: dict[str, Any]
    request_id: str | None


@dataclass(frozen=True, slots=True)
class _Answer:
    """Any successful answer: its `data`, whatever its type, and Kling's request id."""

    data: Any
    request_id: str | None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of the account's task listing; `next_cursor` is empty after the last."""

    tasks: list[dict[str, Any]]
    next_cursor: str
    count: int | None


@dataclass(frozen=True, slots=True)
class Backoff:
    """How often and how patiently retryable errors are tried again."""

    attempts: int = 5
    base: float = 1.0
    cap: float = 30.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)

    def delay(self, attempt: int) -> float:
        return min(self.cap, self.base * 2.0 ** (attempt - 1)) * random.uniform(1.0, 1.5)


class KlingClient:
    """An async client for one Kling account; use it as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        backoff: Backoff = Backoff(),
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not api_key and not (access_key and secret_key):
            raise ValueError("set KLING_API_KEY, or KLING_ACCESS_KEY with KLING_SECRET_KEY")
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._access_key = access_key
        self._secret_key = secret_key
        self._backoff = backoff
        self._clock = clock  # seconds since the epoch, as JWT claims count them
        self._token: tuple[str, float] | None = None
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport, trust_env=False)

    async def __aenter__(self) -> KlingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    def authorization(self) -> str:
        """The Authorization header value: the API key, or a JWT that is valid for a while yet."""
        if self._api_key:
            return f"Bearer {self._api_key}"
        now = self._clock()
        if self._token is None or self._token[1] - now < _REFRESH_MARGIN:
            assert self._access_key and self._secret_key
            claims = {"iss": self._access_key, "exp": int(now) + JWT_LIFETIME, "nbf": int(now) - 5}
            token = jwt.encode(claims, self._secret_key, algorithm="HS256", headers={"typ": "JWT"})
            self._token = (token, now + JWT_LIFETIME)
        return f"Bearer {self._token[0]}"

    async def create(self, action: str, body: dict[str, Any]) -> Reply:
        """Create a task; 1302, 1303 and 5xxx answers are retried with backoff."""
        return _task_reply(await self._call("POST", _path(action), body))

    async def query(self, action: str, task_id: str) -> Reply:
        """The task as Kling sees it now (an `external_task_id` may stand for the task id).

        A current-standard task is asked for through the batch query, alone; a task that
        Kling does not know raises `KlingAPIError` with `not_found`, in both standards.
        """
        if not TASK_ID_PATTERN.fullmatch(task_id):
            raise ValueError(f"unsafe task id {task_id!r}")
        if Standard.of(_checked(action)) is Standard.old:
            return _task_reply(await self._call("GET", f"{_path(action)}/{task_id}", None))
        for key in ("task_ids", "external_task_ids"):
            found = await self.query_batch(**{key: [task_id]})
            if found:
                return Reply(found[0], None)
        raise KlingAPIError(1203, f"no task {task_id}", None, 404)

    async def query_batch(
        self, *, task_ids: list[str] | None = None, external_task_ids: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """The current-standard tasks named (by one kind of id), in as few requests as fit.

        Tasks Kling does not know are left out of the answer, as Kling leaves them out.
        """
        if (task_ids is None) == (external_task_ids is None):
            raise ValueError("give exactly one of task_ids and external_task_ids")
        key, names = "task_ids", task_ids
        if external_task_ids is not None:
            key, names = "external_task_ids", external_task_ids
        assert names is not None
        for name in names:
            if not TASK_ID_PATTERN.fullmatch(name):
                raise ValueError(f"unsafe task id {name!r}")
        found: list[dict[str, Any]] = []
        # Encoded, for ids may hold `+` and `=`, which a query string would misread.
        encoded = [quote(name, safe="") for name in dict.fromkeys(names)]
        for chunk in _chunks(encoded, BATCH_IDS, BATCH_URL_CHARS - len(key) - 1):
            answer = await self._call("GET", f"tasks?{key}={','.join(chunk)}", None)
            if not isinstance(answer.data, list):
                raise KlingUnavailable("GET tasks answered without a list of tasks in `data`")
            found.extend(item for item in answer.data if isinstance(item, dict))
        return found

    async def list_tasks(
        self,
        start_ms: int,
        end_ms: int,
        *,
        cursor: str = "",
        limit: int = LIST_LIMIT,
        statuses: tuple[str, ...] = ("succeeded",),
    ) -> Page:
        """One page of the account's current-standard tasks created in [start_ms, end_ms]."""
        body = {
            "start_time": start_ms,
            "end_time": end_ms,
            "cursor": cursor,
            "limit": limit,
            "filters": [{"key": "status", "values": list(statuses)}],
        }
        data = (await self._call("POST", "tasks", body, repeatable=True)).data
        tasks = data.get("result") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(tasks, list):
            raise KlingUnavailable("POST tasks answered without `data.result`, a list of tasks")
        next_cursor = data.get("next_cursor")
        count = data.get("count")
        return Page(
            [item for item in tasks if isinstance(item, dict)],
            next_cursor if isinstance(next_cursor, str) else "",
            count if isinstance(count, int) and not isinstance(count, bool) else None,
        )

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None, *, repeatable: bool = False
    ) -> _Answer:
        """Send one request, retrying what may be retried; `repeatable` marks a POST that reads."""
        attempt = 1
        resigned = False
        while True:
            try:
                return await self._once(method, path, body)
            except KlingAPIError as exc:
                if exc.code == 1004 and self._token is not None and not resigned:
                    self._token = None  # expired (clocks disagree): sign a new one, once
                    resigned = True
                    continue
                if not exc.retryable or attempt >= self._backoff.attempts:
                    raise
            except KlingUnavailable:
                # A create that got no answer may have gone through; only queries are repeated.
                if not (method == "GET" or repeatable) or attempt >= self._backoff.attempts:
                    raise
            await self._backoff.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _once(self, method: str, path: str, body: dict[str, Any] | None) -> _Answer:
        url = f"{self.base_url}/{path}"
        try:
            response = await self._http.request(
                method, url, json=body, headers={"Authorization": self.authorization()}
            )
        except httpx.HTTPError as exc:
            raise KlingUnavailable(f"{method} {url}: {exc!r}") from exc
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("code"), int):
            raise KlingUnavailable(
                f"{method} {url} answered HTTP {response.status_code} without a Kling body"
            )
        request_id = payload.get("request_id")
        request_id = request_id if isinstance(request_id, str) else None
        if payload["code"] != 0 or response.is_error:
            code = payload["code"] or response.status_code
            message = str(payload.get("message") or response.reason_phrase)
            raise KlingAPIError(code, message, request_id, response.status_code)
        return _Answer(payload.get("data"), request_id)


def _task_reply(answer: _Answer) -> Reply:
    """The answer's task: a dict, or the one dict of a one-element list (aggregators)."""
    data = answer.data
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        raise KlingUnavailable("Kling answered without a task in `data`")
    return Reply(data, answer.request_id)


def _checked(action: str) -> str:
    if not ACTION_PATTERN.fullmatch(action):
        raise ValueError(
            "action must be an old-standard 'videos/text2video' or a current "
            f"'text-to-video/kling-2.6', got {action!r}"
        )
    return action


def _path(action: str) -> str:
    """Where an action's tasks are created (and, in the old standard, queried)."""
    return f"v1/{action}" if Standard.of(_checked(action)) is Standard.old else action


def _chunks(names: list[str], most: int, chars: int) -> list[list[str]]:
    """`names` cut into runs of at most `most` whose comma-joined length stays under `chars`."""
    chunks: list[list[str]] = []
    chunk: list[str] = []
    length = 0
    for name in names:
        if chunk and (len(chunk) == most or length + 1 + len(name) > chars):
            chunks.append(chunk)
            chunk, length = [], 0
        length += len(name) + (1 if chunk else 0)
        chunk.append(name)
    if chunk:
        chunks.append(chunk)
    return chunks


def client_for(
    settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> KlingClient:
    """The client that KLING_API_BASE and the KLING_* credentials describe."""
    api_key = settings.kling_api_key
    secret_key = settings.kling_secret_key
    return KlingClient(
        settings.kling_api_base,
        api_key=api_key.get_secret_value() if api_key else None,
        access_key=settings.kling_access_key,
        secret_key=secret_key.get_secret_value() if secret_key else None,
        backoff=Backoff(base=settings.kling_retry_base_seconds),
        transport=transport,
    )
