"""The Kling HTTP client: create and query tasks of any `action/action2`, auth, error mapping.

Works against Kling's own API and against aggregators: `KLING_API_BASE` may
carry a path prefix (`https://host/kling`), and paths are `v1/{action}[/{id}]`
under it. Auth is an API key sent as Bearer, or an access/secret key pair
turned into a short-lived HS256 JWT (refreshed before it expires).

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

import httpx
import jwt

from receiver.models import ACTION_PATTERN, TASK_ID_PATTERN
from receiver.settings import Settings

__all__ = [
    "Backoff",
    "KlingAPIError",
    "KlingClient",
    "KlingError",
    "KlingUnavailable",
    "Reply",
    "client_for",
]

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
        return await self._call("POST", _path(action), body)

    async def query(self, action: str, task_id: str) -> Reply:
        """The task as Kling sees it now (an `external_task_id` may stand for the task id)."""
        if not TASK_ID_PATTERN.fullmatch(task_id):
            raise ValueError(f"unsafe task id {task_id!r}")
        return await self._call("GET", f"{_path(action)}/{task_id}", None)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Reply:
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
                if method != "GET" or attempt >= self._backoff.attempts:
                    raise
            await self._backoff.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _once(self, method: str, path: str, body: dict[str, Any] | None) -> Reply:
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
        data = payload.get("data")
        if not isinstance(data, dict):
            raise KlingUnavailable(f"{method} {url} answered without a task in `data`")
        return Reply(data, request_id)


def _path(action: str) -> str:
    if not ACTION_PATTERN.fullmatch(action):
        raise ValueError(f"action must look like 'videos/text2video', got {action!r}")
    return f"v1/{action}"


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
