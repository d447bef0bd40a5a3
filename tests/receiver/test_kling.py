"""The Kling client: paths under any base, Bearer key or JWT auth, typed errors and retries."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from receiver.kling import (
    JWT_LIFETIME,
    Backoff,
    KlingAPIError,
    KlingClient,
    KlingUnavailable,
    client_for,
)
from receiver.settings import load_settings
from tests.fake_kling import fake_kling
from tests.support import fixture_json

pytestmark = pytest.mark.anyio

T2V = "videos/text2video"
ACCESS, SECRET = "ak-test-0001", "sk-test-secret-0123456789abcdef-0123456789"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Sleeps:
    """A Backoff sleep that returns at once and remembers what it was asked to wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def client(
    handler: Handler,
    *,
    base: str = "https://aggregator.example/kling/",
    sleeps: Sleeps | None = None,
    attempts: int = 5,
    **auth: Any,
) -> tuple[KlingClient, list[httpx.Request]]:
    """A client whose requests go to `handler`; the list collects them."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    backoff = Backoff(attempts=attempts, base=0.01, sleep=sleeps or Sleeps())
    auth = auth or {"api_key": "key-1"}
    made = KlingClient(base, backoff=backoff, transport=httpx.MockTransport(record), **auth)
    return made, seen


def reply(data: dict[str, Any] | None = None, status: int = 200) -> httpx.Response:
    body = fixture_json("create_response.json")
    if data is not None:
        body["data"] = data
    return httpx.Response(status, json=body)


def refusals(*codes: int) -> Handler:
    """Answer with these Kling errors in turn, then with the create response."""
    queue = list(codes)

    def handle(request: httpx.Request) -> httpx.Response:
        if not queue:
            return reply()
        code = queue.pop(0)
        status = {1201: 400, 1302: 429, 1303: 429, 5000: 500, 5001: 503}[code]
        return httpx.Response(status, json={"code": code, "message": f"m{code}", "request_id": "r"})

    return handle


def unchecked(token: str) -> dict[str, Any]:
    """A token's claims, its signature checked but not its times (the test clock runs ahead)."""
    claims: dict[str, Any] = jwt.decode(
        token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False}
    )
    return claims


async def test_create_and_query_go_under_the_base_path() -> None:
    """Paths are v1/{action}[/{id}] under the base, whatever path prefix the base carries."""
    kling, seen = client(lambda request: reply())
    async with kling:
        created = await kling.create(T2V, {"prompt": "a cat", "duration": "5"})
        queried = await kling.query(T2V, "867283741759111202")

    post, get = seen
    assert (post.method, str(post.url)) == (
        "POST",
        "https://aggregator.example/kling/v1/videos/text2video",
    )
    assert json.loads(post.content) == {"prompt": "a cat", "duration": "5"}
    assert (get.method, str(get.url)) == (
        "GET",
        "https://aggregator.example/kling/v1/videos/text2video/867283741759111202",
    )
    assert created.data["task_id"] == queried.data["task_id"] == "867283741759111202"
    assert created.request_id == "c0656403-1e6e-4b7e-b8f8-2cdd2595f2b9"


async def test_an_api_key_is_sent_as_a_bearer_token() -> None:
    """With KLING_API_KEY the header is `Bearer <key>` on every request."""
    kling, seen = client(lambda request: reply(), api_key="key-abc")
    async with kling:
        await kling.create(T2V, {})
        await kling.query(T2V, "t1")
    assert [r.headers["Authorization"] for r in seen] == ["Bearer key-abc"] * 2


async def test_the_jwt_decodes_with_the_secret_and_carries_iss_exp_nbf() -> None:
    """The JWT is HS256 over {iss: access key, exp: now + 30 min, nbf: now - 5 s}."""
    clock = Clock()
    kling = KlingClient("https://k.example", access_key=ACCESS, secret_key=SECRET, clock=clock)
    async with kling:
        scheme, token = kling.authorization().split(" ")

    assert scheme == "Bearer"
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], issuer=ACCESS)
    assert claims == {"iss": ACCESS, "exp": int(clock.now) + 1800, "nbf": int(clock.now) - 5}
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-" + "x" * 32, algorithms=["HS256"])


async def test_the_jwt_is_reused_while_valid_and_replaced_before_it_expires() -> None:
    """The same token serves for most of its life; a new one comes while the old still works."""
    clock = Clock()
    kling = KlingClient("https://k.example", access_key=ACCESS, secret_key=SECRET, clock=clock)
    async with kling:
        first = kling.authorization()
        clock.now += JWT_LIFETIME / 2
        assert kling.authorization() == first
        clock.now += JWT_LIFETIME / 2 - 60  # a minute before the first one expires
        second = kling.authorization()

    assert second != first
    old, new = (unchecked(token.split()[1]) for token in (first, second))
    assert old["exp"] > clock.now  # replaced before expiry, not after
    assert new["exp"] == int(clock.now) + JWT_LIFETIME
    assert new["nbf"] <= clock.now


async def test_a_kling_that_checks_jwts_accepts_the_clients_and_refuses_a_wrong_secret() -> None:
    """Against the fake Kling: a token from the right secret passes; another one is 401 / 1002."""
    with fake_kling(access_key=ACCESS, secret_key=SECRET) as fake:
        async with KlingClient(fake.base_url, access_key=ACCESS, secret_key=SECRET) as kling:
            created = await kling.create(T2V, {"prompt": "p"})
        async with KlingClient(
            fake.base_url, access_key=ACCESS, secret_key="wrong-secret-key-" + "x" * 32
        ) as forged:
            with pytest.raises(KlingAPIError) as refused:
                await forged.query(T2V, created.data["task_id"])

    assert [claims["iss"] for claims in fake.claims] == [ACCESS]
    assert (refused.value.code, refused.value.http_status) == (1002, 401)
    assert not refused.value.retryable
    assert list(fake.tasks) == [created.data["task_id"]]


async def test_an_expired_jwt_is_signed_again_once_then_refused() -> None:
    """A token Kling calls expired (1004) is signed afresh once; still expired, the 401 stands."""
    clock = Clock()
    clock.now -= 3600
    with fake_kling(access_key=ACCESS, secret_key=SECRET) as fake:
        async with KlingClient(
            fake.base_url, access_key=ACCESS, secret_key=SECRET, clock=clock
        ) as kling:
            with pytest.raises(KlingAPIError) as refused:
                await kling.create(T2V, {"prompt": "p"})

    assert (refused.value.code, refused.value.http_status) == (1004, 401)
    assert len(fake.creates()) == 2 and fake.tasks == {}


@pytest.mark.parametrize("code", [1302, 1303, 5000, 5001])
async def test_rate_limits_concurrency_and_kling_trouble_are_retried_with_backoff(
    code: int,
) -> None:
    """1302, 1303 and 5xxx are retried after growing waits; the same request goes again."""
    sleeps = Sleeps()
    kling, seen = client(refusals(code, code), sleeps=sleeps)
    async with kling:
        created = await kling.create(T2V, {"prompt": "again", "external_task_id": "kr-1"})

    assert created.data["task_id"] == "867283741759111202"
    assert len(seen) == 3
    assert len({r.content for r in seen}) == 1
    assert len(sleeps.delays) == 2
    assert 0.01 <= sleeps.delays[0] <= 0.015 and 0.02 <= sleeps.delays[1] <= 0.03


async def test_a_refusal_is_raised_at_once_with_klings_code_message_and_request_id() -> None:
    """1201 is not retried: KlingAPIError carries the code, message, request id and HTTP status."""
    sleeps = Sleeps()
    body = fixture_json("error_1201_params.json")
    kling, seen = client(lambda request: httpx.Response(400, json=body), sleeps=sleeps)
    async with kling:
        with pytest.raises(KlingAPIError) as refused:
            await kling.create(T2V, {"duration": "7"})

    error = refused.value
    assert (error.code, error.message) == (1201, "duration: must be one of [5, 10]")
    assert (error.request_id, error.http_status) == (body["request_id"], 400)
    assert not error.retryable and not error.not_found
    assert len(seen) == 1 and sleeps.delays == []


async def test_an_expired_token_is_not_retried() -> None:
    """1004 (token expired) is an auth failure, not something to hammer."""
    body = fixture_json("error_1004_expired.json")
    kling, seen = client(lambda request: httpx.Response(401, json=body))
    async with kling:
        with pytest.raises(KlingAPIError) as refused:
            await kling.query(T2V, "t1")
    assert (refused.value.code, refused.value.http_status, len(seen)) == (1004, 401, 1)


async def test_retries_stop_after_the_configured_attempts() -> None:
    """A concurrency limit that never lifts ends in the 1303 error after `attempts` tries."""
    sleeps = Sleeps()
    kling, seen = client(refusals(*[1303] * 10), sleeps=sleeps, attempts=3)
    async with kling:
        with pytest.raises(KlingAPIError) as refused:
            await kling.create(T2V, {})
    assert (refused.value.code, refused.value.http_status) == (1303, 429)
    assert refused.value.retryable
    assert len(seen) == 3 and len(sleeps.delays) == 2


async def test_an_unanswered_create_is_not_repeated_but_a_query_is() -> None:
    """No answer to a create may mean it went through, so only queries are tried again."""

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    kling, seen = client(unreachable, attempts=3)
    async with kling:
        with pytest.raises(KlingUnavailable):
            await kling.create(T2V, {})
        assert len(seen) == 1
        with pytest.raises(KlingUnavailable) as unavailable:
            await kling.query(T2V, "t1")
    assert len(seen) == 4
    assert unavailable.value.retryable


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(502, text="<html>Bad Gateway</html>"),
        httpx.Response(200, json={"code": 0, "message": "SUCCEED", "data": None}),
        httpx.Response(200, json={"message": "no code"}),
        httpx.Response(200, json=[1, 2]),
    ],
    ids=["html", "no-data", "no-code", "array"],
)
async def test_an_answer_that_is_not_a_kling_body_is_unavailable(answer: httpx.Response) -> None:
    """An HTML error page or a body without `code` / `data` is KlingUnavailable, not a crash."""
    kling, _ = client(lambda request: answer)
    async with kling:
        with pytest.raises(KlingUnavailable):
            await kling.create(T2V, {})


async def test_an_unknown_task_is_not_found() -> None:
    """404 with code 1203 is recognisable as 'no such task'."""
    body = {"code": 1203, "message": "Task not found", "request_id": "r"}
    kling, _ = client(lambda request: httpx.Response(404, json=body))
    async with kling:
        with pytest.raises(KlingAPIError) as missing:
            await kling.query(T2V, "kr-nothing")
    assert missing.value.not_found and not missing.value.retryable


@pytest.mark.parametrize(
    ("action", "task_id"),
    [("videos", "t1"), ("videos/../admin", "t1"), ("Videos/T2V", "t1"), (T2V, "../t1"), (T2V, "")],
)
async def test_unsafe_actions_and_task_ids_are_refused_before_any_request(
    action: str, task_id: str
) -> None:
    """Nothing that could reshape the URL path is sent."""
    kling, seen = client(lambda request: reply())
    async with kling:
        with pytest.raises(ValueError):
            await kling.query(action, task_id)
        if action != T2V:
            with pytest.raises(ValueError):
                await kling.create(action, {})
    assert seen == []


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    """Waits double from `base` (plus up to 50 % jitter) and stop growing at `cap`."""
    backoff = Backoff(base=1.0, cap=4.0)
    assert 1.0 <= backoff.delay(1) <= 1.5
    assert 2.0 <= backoff.delay(2) <= 3.0
    assert 4.0 <= backoff.delay(10) <= 6.0


async def test_client_for_follows_the_settings(tmp_path: Path) -> None:
    """KLING_API_BASE (prefix kept, trailing slash dropped) and the key reach the client."""
    settings = load_settings(
        _env_file=None,
        data_dir=tmp_path,
        callback_secret="c" * 32,
        admin_token="a" * 32,
        kling_api_base="http://127.0.0.1:9/kling/",
        kling_api_key="key-from-env",
        kling_retry_base_seconds=0.25,
    )
    async with client_for(settings) as kling:
        assert kling.base_url == "http://127.0.0.1:9/kling"
        assert kling.authorization() == "Bearer key-from-env"


def test_a_client_needs_an_api_key_or_both_halves_of_a_key_pair() -> None:
    """Without credentials (or with an access key alone) no client is made."""
    with pytest.raises(ValueError, match="KLING_API_KEY"):
        KlingClient("https://k.example")
    with pytest.raises(ValueError, match="KLING_SECRET_KEY"):
        KlingClient("https://k.example", access_key=ACCESS)


async def test_an_http_5xx_without_a_kling_code_is_retried() -> None:
    """A 502 whose body says code 0 is the gateway's trouble: retried, and then it works."""
    answers = [httpx.Response(502, json={"code": 0, "message": "bad gateway"})]

    def handle(request: httpx.Request) -> httpx.Response:
        return answers.pop(0) if answers else reply()

    kling, seen = client(handle)
    async with kling:
        created = await kling.create(T2V, {"prompt": "p"})
    assert created.data["task_id"] == "867283741759111202"
    assert len(seen) == 2
