"""Drill: fuzz the callback endpoint with arbitrary methods, paths, headers and bodies.

Whatever arrives: no 5xx, the service keeps answering /healthz, and nothing is recorded
unless the URL carries a valid token and the answer is 200. The bulk runs against the
app in process (Starlette's TestClient); a shorter run goes to the real process. The
examples are derandomized, so every run (and CI) tries the same ones.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import socket
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook
from starlette.testclient import TestClient

from receiver import tokens
from receiver.app import create_app
from receiver.models import ACTION_PATTERN, TASK_ID_PATTERN
from tests.support import ADMIN_TOKEN, CALLBACK_SECRET, Service, app_settings, fixture_json

MAX_CALLBACK_BYTES = 1024 * 1024  # the default MAX_CALLBACK_BYTES
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"fuzz-webhook-secret-0123456789ab").decode()

# Derandomized: the same examples on every run; no example database is read or written.
DRILL = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- bodies ---------------------------------------------------------------------------

# Text that may hold lone surrogates: json.dumps escapes them (\ud800), json.loads restores them.
any_text = st.one_of(
    st.text(max_size=24),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
    st.text(st.characters(categories=["Cs", "L", "N", "P", "Zs", "Cc"]), max_size=12),
)
# Values at the edges of what Python, JSON and SQLite hold: 64-bit integers and past them,
# lone surrogates, NUL, a right-to-left override, a long string, the largest float.
int_edges = st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, 0, -1])
text_edges = st.sampled_from(["\ud800", "a\udfffb", "\x00", "", " ", "\u202e", "x" * 5000])
edges = int_edges | text_edges | st.sampled_from([1.7976931348623157e308, -0.0, True, None])
any_json: st.SearchStrategy[Any] = st.recursive(
    edges
    | st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
# A field of a task object: mostly of its type, at the edges or anywhere, else anything.
ints = st.one_of(int_edges, st.integers(), int_edges, any_json)
texts = st.one_of(text_edges, any_text, text_edges, any_json)
known_statuses = st.sampled_from(["submitted", "processing", "succeed", "failed"])
good_task_ids = st.from_regex(TASK_ID_PATTERN, fullmatch=True)
urls = st.sampled_from(["https://cdn.example/v.mp4", "http://127.0.0.1/x", "", "file:///etc"])
videos = st.fixed_dictionaries({"url": urls | texts}, optional={"id": texts, "duration": texts})
images = st.fixed_dictionaries({"url": urls | texts}, optional={"index": ints})
results = st.fixed_dictionaries(
    {},
    optional={
        "videos": st.lists(videos, max_size=3) | any_json,
        "images": st.lists(images, max_size=3) | any_json,
    },
)
# Kling task objects that look right, with any field of the wrong type or out of range;
# mostly a good id and status, so that the other fields get looked at.
kling_tasks = st.fixed_dictionaries(
    {
        "task_id": st.one_of(good_task_ids, good_task_ids, good_task_ids, ints, texts),
        "task_status": st.one_of(known_statuses, known_statuses, texts),
    },
    optional={
        "task_status_msg": texts,
        "created_at": ints,
        "updated_at": ints,
        "task_info": st.fixed_dictionaries({}, optional={"external_task_id": texts}) | any_json,
        "task_result": results | any_json,
        "final_unit_deduction": texts,
    },
)


@st.composite
def json_bodies(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    """JSON text of `values`, ASCII-escaped or raw (lone surrogates passed through as is)."""
    value = draw(values)
    if draw(st.booleans()):
        return json.dumps(value).encode()
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


# Named builders, so that a failing example is shown as `padded(1048580)`, not a MiB of bytes.
def long_number(digits: int) -> bytes:
    """Past Python's 4300-digit limit on int()."""
    return b'{"task_id":"1","task_status":"x","y":' + b"7" * digits + b"}"


def padded(size: int) -> bytes:
    """An empty object after blanks, `size` bytes in all: around MAX_CALLBACK_BYTES."""
    return b" " * (size - 2) + b"{}"


def nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return (
        b'{"task_id":"1","task_status":"submitted","x":'
        + b'{"a":' * depth
        + b"1"
        + b"}" * (depth + 1)
    )


pathological = st.one_of(
    st.builds(nested, st.integers(1, 200_000), st.sampled_from(["array", "object"])),
    st.builds(long_number, st.integers(4000, 5000)),
    st.builds(padded, st.integers(MAX_CALLBACK_BYTES - 8, MAX_CALLBACK_BYTES + 8)),
    st.sampled_from(
        [
            b"\xef\xbb\xbf{}",
            json.dumps({"task_id": "1", "task_status": "submitted"}).encode("utf-16"),
            b'{"task_id": "1", "task_status": "submitted"} trailing',
            b"NaN",
            b'{"task_id": "1", "task_status": "submitted", "created_at": 1e999}',
            b"\x00" * 16,
        ]
    ),
)
bodies = st.one_of(
    json_bodies(kling_tasks),
    st.binary(max_size=512),
    st.text(max_size=256).map(str.encode),
    json_bodies(any_json),
    pathological,
)

# -- requests -------------------------------------------------------------------------

refs = st.one_of(
    st.from_regex(TASK_ID_PATTERN, fullmatch=True).map(lambda external: "x-" + external),
    st.from_regex(TASK_ID_PATTERN, fullmatch=True).map(lambda handmade: "h-" + handmade),
)
actions = st.none() | st.from_regex(ACTION_PATTERN, fullmatch=True)
segments = st.text(min_size=1, max_size=30).map(lambda text: quote(text, safe=""))


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    valid: bool  # a POST to a URL signed with CALLBACK_SECRET
    headers: list[tuple[bytes, bytes]]
    body: bytes
    # A Kling-like task object for a signed URL, sent by `fresh()` as (un)escaped JSON.
    task: dict[str, Any] | None = None
    ref: str = ""
    action: str | None = None
    escaped: bool = True

    def fresh(self, number: int) -> tuple[str, bytes]:
        """The path and body to send, a task's id and URL made unique with `number`.

        Otherwise the simple ids the fuzzer favours ("0") would be refused as bound to
        another URL or counted as duplicates, and never reach the ledger's columns.
        """
        if self.task is None:
            return self.path, self.body
        task, ref = dict(self.task), f"{self.ref}_{number}"
        task_id = task.get("task_id")
        if isinstance(task_id, str) and TASK_ID_PATTERN.fullmatch(f"{task_id}_{number}"):
            task["task_id"] = f"{task_id}_{number}"
        if not TASK_ID_PATTERN.fullmatch(ref[2:]):
            ref = self.ref
        path = tokens.callback_path(CALLBACK_SECRET, ref, self.action)
        if self.escaped:
            return path, json.dumps(task).encode()
        return path, json.dumps(task, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def paths(draw: st.DrawFn) -> tuple[str, bool]:
    """A callback path and whether its token is valid: signed, forged, cut short, or junk."""
    ref, action = draw(refs), draw(actions)
    signed = tokens.callback_path(CALLBACK_SECRET, ref, action)
    sig = signed.split("/")[4]
    choice = draw(st.integers(0, 7))
    if choice <= 2:
        return signed, True
    if choice == 3:  # one character of the signature changed
        at = draw(st.integers(0, len(sig) - 1))
        other = draw(st.sampled_from([c for c in "AbZ09-_" if c != sig[at]]))
        return signed.replace(sig, sig[:at] + other + sig[at + 1 :]), False
    if choice == 4:  # signed with another secret, or the action swapped
        wrong = tokens.callback_path("another-secret-0123456789abcdef", ref, action)
        swapped = draw(actions)
        if swapped != action and action is not None and swapped is not None:
            return signed.removesuffix(action) + swapped, False
        return wrong, False
    if choice == 5:  # cut short, or with more after it
        cut = draw(st.integers(1, signed.count("/") - 1))
        short = "/".join(signed.split("/")[: cut + 1])
        return draw(st.sampled_from([short, signed + "/", signed + "/" + draw(segments)])), False
    if choice == 6:
        parts = draw(st.lists(segments, min_size=0, max_size=5))
        return tokens.CALLBACK_PREFIX + "/" + "/".join(parts), False
    return "/" + "/".join(draw(st.lists(segments, max_size=4))), False


header_names = st.sampled_from(
    [
        b"content-type",
        b"content-encoding",
        b"content-length",
        b"user-agent",
        b"webhook-id",
        b"webhook-timestamp",
        b"webhook-signature",
        b"x-forwarded-for",
        b"x-request-id",
        b"authorization",
        b"cookie",
        b"accept",
    ]
) | st.from_regex(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}", fullmatch=True)
header_values = st.binary(max_size=60).map(
    # What HTTP/1.1 can carry in a field value: no control characters, no outer spaces.
    lambda raw: bytes(b for b in raw if b >= 0x20 and b != 0x7F).strip()
) | st.sampled_from(
    [
        b"application/json",
        b"application/json; charset=utf-16",
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=x",
        b"gzip",
        b"\xb2",
        b"-1",
        b"99999999999999999999",
        b"v1,AAAA v1,",
        b"v1,",
        b"1e10",
    ]
)
methods = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])


@st.composite
def calls(draw: st.DrawFn, content_length: bool = True, objects: bool = False) -> Call:
    """Any request, half the time a POST to a signed URL; with `objects`, always a POST of
    a Kling-like task object to a signed URL."""
    names = header_names if content_length else header_names.filter(lambda n: not _framing(n))
    headers = draw(st.lists(st.tuples(names, header_values), max_size=6))
    if objects or draw(st.booleans()):
        ref, action = draw(refs), draw(actions)
        path = tokens.callback_path(CALLBACK_SECRET, ref, action)
        if objects:
            task, escaped = draw(kling_tasks), draw(st.integers(0, 3)) < 3
            return Call("POST", path, True, headers, b"", task, ref, action, escaped)
        return Call("POST", path, True, headers, draw(bodies))
    method = draw(methods)
    path, valid = draw(paths())
    body = draw(bodies)
    return Call(method, path, valid and method == "POST", headers, body)


def _framing(name: bytes) -> bool:
    return name.lower() in (b"content-length", b"transfer-encoding", b"host", b"connection")


# -- what the ledger holds --------------------------------------------------------------


@contextmanager
def ledger_counts(db: Path) -> Iterator[Callable[[], tuple[int, int, int]]]:
    """Tasks, distinct deliveries and deliveries received, read straight from SQLite."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:

        def counts() -> tuple[int, int, int]:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM events),"
                " (SELECT coalesce(sum(times_received), 0) FROM events)"
            ).fetchone()
            return int(row[0]), int(row[1]), int(row[2])

        yield counts


def check(call: Call, sent: tuple[str, bytes], status: int, text: str, counts: Any) -> None:
    """The answer to `call` (`sent` as path and body), and the ledger's counts before and after."""
    path, body = sent
    said = f"{call.method} {path} with {body[:200]!r} answered {status}: {text[:300]}"
    assert status < 500, said
    if not call.valid and call.method == "POST" and path.startswith("/callbacks/"):
        # 307: Starlette's redirect of a path with one slash too many to the one without.
        assert status in (404, 307), said
    if status != 200 or not call.valid:
        before, after = counts
        assert after == before, f"recorded without a valid token and a 200: {said}"


# -- the in-process app ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("signatures", "objects"),
    [(False, False), (True, False), (False, True)],
    ids=["any-request", "any-request-webhook-signed", "task-objects"],
)
def test_fuzzed_callbacks_in_process(tmp_path: Path, signatures: bool, objects: bool) -> None:
    """300 requests each: none gets a 5xx, none without a valid token is recorded.

    Any method, path, headers and body; or (`objects`) Kling task objects with fields of
    every type and value, each with an id and URL of its own so that it reaches the ledger.
    """
    options: dict[str, Any] = {"kling_webhook_secret": WEBHOOK_SECRET} if signatures else {}
    configured = app_settings(tmp_path, **options)
    webhook = Webhook(WEBHOOK_SECRET)
    with (
        # An exception in the app is raised here, so that Hypothesis tells bugs apart by it.
        TestClient(create_app(configured)) as client,
        ledger_counts(tmp_path / "data" / "kling-receiver.db") as counts,
    ):
        numbers = itertools.count()

        @DRILL
        @given(call=calls(objects=objects), unsigned=st.integers(0, 3))
        def fuzz(call: Call, unsigned: int) -> None:
            path, body = sent = call.fresh(next(numbers))
            headers = list(call.headers)
            if signatures and unsigned:  # mostly a correct signature, so the body gets parsed
                at, msg_id = datetime.now(UTC), "msg_" + secrets.token_hex(6)
                signature = webhook.sign(msg_id, at, body.decode("utf-8", "replace"))
                headers = [h for h in headers if not h[0].lower().startswith(b"webhook-")] + [
                    (b"webhook-id", msg_id.encode()),
                    (b"webhook-timestamp", str(int(at.timestamp())).encode()),
                    (b"webhook-signature", signature.encode()),
                ]
            before = counts()
            response = client.request(
                call.method, path, content=body, headers=headers, follow_redirects=False
            )
            check(call, sent, response.status_code, response.text, (before, counts()))
            assert client.get("/healthz").status_code == 200

        fuzz()


FOUND = {
    # Each a body the fuzzer found that a valid callback URL answers with 500.
    "nested-json": b"[" * 100_000 + b"]" * 100_000,
    "surrogate-in-status-msg": (
        b'{"task_id":"1","task_status":"succeed","task_status_msg":"\\udfff"}'
    ),
    "surrogate-in-external-id": (
        b'{"task_id":"2","task_status":"submitted","task_info":{"external_task_id":"\\ud800"}}'
    ),
    "int-over-64-bits": (
        b'{"task_id":"3","task_status":"submitted","updated_at":18446744073709551616}'
    ),
}


@pytest.mark.parametrize("body", FOUND.values(), ids=FOUND.keys())
def test_fuzz_findings_are_not_server_errors(tmp_path: Path, body: bytes) -> None:
    """What the fuzzer found, kept as plain examples: a 4xx that says why, nothing recorded."""
    configured = app_settings(tmp_path)
    with TestClient(create_app(configured), raise_server_exceptions=False) as client:
        url = tokens.callback_path(CALLBACK_SECRET, tokens.new_channel_ref(), "videos/text2video")
        response = client.post(url, content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, response.text
        tasks = client.get("/api/tasks", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert tasks.json()["tasks"] == []


# -- the real process -----------------------------------------------------------------

RAW_REQUESTS = [
    b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n{}",
    b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n{}",
    b"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n"
    b"\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}",  # then hangs up
    b"POST {path} HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"POST {path}\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST {path} HTTP/9.9\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
    b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
]


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read whatever comes back until the server closes or 2 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def logged_errors(service: Service) -> list[str]:
    """The service's error lines, each with the last line of its traceback."""
    return [
        f"{entry['message']}: {entry.get('exception', '').strip().splitlines()[-1:]}"
        for entry in service.log_entries()
        if entry.get("level") in ("error", "critical")
    ]


@pytest.mark.e2e
def test_fuzzed_callbacks_to_the_real_process(services: Callable[..., Service]) -> None:
    """100 fuzzed requests over real HTTP: no 5xx, nothing recorded without a valid token,
    /healthz answers and nothing is logged as an error."""
    service = services()
    with (
        httpx.Client(base_url=service.base_url, timeout=10, trust_env=False) as client,
        ledger_counts(service.data_dir / "kling-receiver.db") as counts,
    ):
        numbers = itertools.count()

        @settings(DRILL, max_examples=100)
        @given(call=calls(content_length=False) | calls(content_length=False, objects=True))
        def fuzz(call: Call) -> None:
            path, body = sent = call.fresh(next(numbers))
            before = counts()
            response = client.request(call.method, path, content=body, headers=call.headers)
            check(call, sent, response.status_code, response.text, (before, counts()))

        fuzz()
        assert client.get("/healthz").status_code == 200
    assert service.process is not None and service.process.poll() is None
    errors = logged_errors(service)
    assert not errors, "the service logged errors:\n" + "\n".join(errors)


@pytest.mark.e2e
def test_malformed_http_to_the_real_process(services: Callable[..., Service]) -> None:
    """Broken framing, senders that hang up mid-body, junk on the port: no 5xx, nothing
    recorded, the process stays up, and none of it is logged as an error of the service."""
    service = services()
    valid_path = tokens.callback_path(CALLBACK_SECRET, tokens.new_channel_ref(), None)
    forged_path = tokens.CALLBACK_PREFIX + "/h-0123/" + "A" * 32
    with ledger_counts(service.data_dir / "kling-receiver.db") as counts:
        before = counts()
        for template in RAW_REQUESTS:
            for path in (valid_path, forged_path):
                answer = raw_exchange(service.port, template.replace(b"{path}", path.encode()))
                status_line = answer.split(b"\r\n", 1)[0]
                assert not status_line.startswith(b"HTTP/1.1 5"), (template[:60], answer[:300])
                assert service.process is not None and service.process.poll() is None
        assert counts() == before
        assert httpx.get(service.base_url + "/healthz", trust_env=False).status_code == 200
        succeed = fixture_json("callback_text2video_succeed.json")
        recorded = httpx.post(service.base_url + valid_path, json=succeed, trust_env=False)
        assert recorded.status_code == 200, recorded.text
        assert counts()[0] == before[0] + 1
    errors = logged_errors(service)
    assert not errors, "the service logged errors:\n" + "\n".join(errors)
