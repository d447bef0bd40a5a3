"""A fake Kling API served for real on 127.0.0.1, speaking Kling's JSON shapes.

`POST {base}/v1/{action}/{action2}` creates a task, `GET {base}/v1/{action}/{action2}/{id}`
answers by task_id or external_task_id, where `base` is `http://127.0.0.1:PORT/kling` (an
aggregator-style path prefix). Every request is checked for `Authorization: Bearer <key>`
or a JWT signed with the secret key, and recorded. The test moves tasks along
(`advance`), and POSTs the flat task object to a task's callback URL only when it
asks (`send_callback`), so a callback can be lost, duplicated or forged on purpose.

    with fake_kling(media, api_key="k") as kling:
        kling.fail_creates(1303, 1303)          # two refusals, then the create goes through
        ...
        kling.advance(task_id)                   # submitted -> processing
        kling.advance(task_id)                   # processing -> succeed, files on `media`
        kling.send_callback(task_id)
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt

from tests.media_server import MediaServer, Serve

PREFIX = "/kling"
_CREATE = re.compile(r"/v1/([a-z0-9][a-z0-9_-]*/[a-z0-9][a-z0-9_-]*)")
_QUERY = re.compile(r"/v1/([a-z0-9][a-z0-9_-]*/[a-z0-9][a-z0-9_-]*)/([^/]+)")
_NEXT = {"submitted": "processing", "processing": "succeed"}

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


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any


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
    urls: list[str] = field(default_factory=list)
    queries: int = 0

    def as_json(self) -> dict[str, Any]:
        """The flat task object, as a query's `data` and as a callback body."""
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
            data["task_result"] = result(self.task_id, self.action, self.urls)
        return data


def result(task_id: str, action: str, urls: list[str]) -> dict[str, Any]:
    """A task_result naming these URLs, videos or images as the action makes."""
    if action.startswith("images/"):
        return {"images": [{"index": n, "url": url} for n, url in enumerate(urls)]}
    return {
        "videos": [
            {"id": f"{task_id}_{n}", "url": url, "duration": "5.1"} for n, url in enumerate(urls)
        ]
    }


class FakeKling:
    """A threaded HTTP server on 127.0.0.1 that plays Kling's task API."""

    def __init__(
        self,
        media: MediaServer | None = None,
        *,
        api_key: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        self.media = media
        self.api_key = api_key
        self.access_key = access_key
        self.secret_key = secret_key
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
    ) -> FakeTask:
        """A task Kling knows without having been asked through this fake's API."""
        with self._lock:
            task = FakeTask(
                self._new_id(),
                action,
                external_task_id=external_task_id,
                callback_url=callback_url,
                status=status,
            )
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
    ) -> FakeTask:
        """Move a task on one step (submitted, processing, succeed) or straight to `to`.

        A task turning `succeed` gets `urls`, or else `files` new files on the media server.
        """
        with self._lock:
            task = self.tasks[task_id]
            status = to or _NEXT[task.status]
        if status == "succeed" and urls is None:
            urls = [self.add_file(f"/kling/{task_id}/{n}", task.action) for n in range(files)]
        with self._lock:
            task.status, task.status_msg = status, msg
            task.updated_at = max(now_ms(), task.updated_at + 1)
            if urls is not None:
                task.urls = list(urls)
        return task

    def add_file(self, stem: str, action: str = "videos/text2video") -> str:
        """A new file with random bytes on the media server; returns its URL."""
        assert self.media is not None, "FakeKling needs a media server to make result files"
        path = stem + (".png" if action.startswith("images/") else ".mp4")
        body = random.Random(path).randbytes(5000)
        content_type = "image/png" if path.endswith(".png") else "video/mp4"
        url = self.media.add(path, body, [Serve(content_type=content_type)])
        self.files[url] = body
        return url

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
                and (external_task_id is None or r.body.get("external_task_id") == external_task_id)
            ]

    def queries(self, task_id: str | None = None) -> list[Recorded]:
        """Every query (for one task: by its task_id or its external_task_id)."""
        with self._lock:
            names = None
            if task_id is not None:
                task = self.tasks.get(task_id)
                names = {task_id, task.external_task_id if task else None}
            return [
                r
                for r in self.requests
                if r.method == "GET" and (names is None or r.path.rsplit("/", 1)[-1] in names)
            ]

    def send_callback(self, task_id: str, body: dict[str, Any] | None = None) -> int | None:
        """POST the task (or `body`) to its callback URL now; the status, or None if unreachable."""
        task = self.task(task_id)
        assert task.callback_url is not None, f"task {task_id} has no callback_url"
        payload = task.as_json() if body is None else body
        try:
            response = httpx.post(
                task.callback_url,
                content=json.dumps(payload).encode(),
                headers={"content-type": "application/json", "user-agent": "fake-kling"},
                timeout=5,
                trust_env=False,
            )
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

    def _create(self, action: str, body: Any) -> tuple[int, dict[str, Any]]:
        if self._errors:
            return _error(self._errors.pop(0))
        if self._always is not None:
            return _error(self._always)
        if not isinstance(body, dict):
            return _error(1201, "the body must be a JSON object")
        external = body.get("external_task_id")
        if external is not None and any(
            t.external_task_id == external for t in self.tasks.values()
        ):
            return _error(1201, "external_task_id already exists")
        task = FakeTask(
            self._new_id(),
            action,
            external_task_id=external,
            callback_url=body.get("callback_url"),
            params={k: v for k, v in body.items() if k not in ("callback_url", "external_task_id")},
        )
        self.tasks[task.task_id] = task
        data = task.as_json()
        del data["task_status_msg"]
        return 200, {"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data}

    def _query(self, action: str, name: str) -> tuple[int, dict[str, Any]]:
        found = self.tasks.get(name) or next(
            (t for t in self.tasks.values() if t.external_task_id == name), None
        )
        if found is None or found.action != action:
            return _error(1203)
        found.queries += 1
        return 200, {
            "code": 0,
            "message": "SUCCEED",
            "request_id": str(uuid.uuid4()),
            "data": found.as_json(),
        }

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
                path = self.path.split("?")[0]
                with fake._lock:
                    headers = {name.lower(): value for name, value in self.headers.items()}
                    fake.requests.append(Recorded(method, path, headers, body))
                    status, answer = self._answer(method, path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _answer(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
                if not path.startswith(PREFIX + "/"):
                    return _error(1203, f"no such path {path}")
                refused = fake._refusal(self.headers.get("Authorization", ""))
                if refused is not None:
                    return _error(refused)
                route = path[len(PREFIX) :]
                if method == "POST" and (match := _CREATE.fullmatch(route)):
                    return fake._create(match[1], body)
                if method == "GET" and (match := _QUERY.fullmatch(route)):
                    return fake._query(match[1], match[2])
                return _error(1202, f"{method} {path} is not an API")

        return Handler


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
) -> Iterator[FakeKling]:
    """A started fake Kling API, stopped on exit."""
    fake = FakeKling(media, api_key=api_key, access_key=access_key, secret_key=secret_key)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
