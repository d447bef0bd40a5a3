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
    BATCH_IDS,
    BATCH_URL_CHARS,
    JWT_LIFETIME,
    Backoff,
    KlingAPIError,
    KlingClient,
    KlingUnavailable,
    Page,
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


# -- the current standard: model paths, batch queries and the task listing ----------------

T26 = "text-to-video/kling-2.6"


def kling_answer(data: Any) -> httpx.Response:
    """Kling's envelope around `data`, whatever it is."""
    return httpx.Response(
        200, json={"code": 0, "message": "SUCCEED", "request_id": "r", "data": data}
    )


def batch_echo(request: httpx.Request) -> httpx.Response:
    """A batch query answered with one TASK2 stub per id asked for."""
    (key,) = request.url.params.keys()
    return kling_answer([{"id": name} for name in request.url.params[key].split(",")])


def asked(request: httpx.Request) -> list[str]:
    """The ids one batch query named."""
    (key,) = request.url.params.keys()
    return request.url.params[key].split(",")


async def test_a_current_standard_create_goes_to_the_model_path_and_an_old_one_under_v1() -> None:
    """The new standard has no `v1/`: `{base}/{product}/{model}`, dots and all."""
    kling, seen = client(lambda request: reply())
    async with kling:
        await kling.create(T26, {"prompt": "a cat", "settings": {"duration": 5}})
        await kling.create(T2V, {"prompt": "a cat"})

    assert [(r.method, str(r.url)) for r in seen] == [
        ("POST", "https://aggregator.example/kling/text-to-video/kling-2.6"),
        ("POST", "https://aggregator.example/kling/v1/videos/text2video"),
    ]
    assert json.loads(seen[0].content) == {"prompt": "a cat", "settings": {"duration": 5}}


async def test_a_batch_query_asks_at_most_50_ids_at_a_time_and_leaves_out_unknown_ones() -> None:
    """120 ids are three `GET tasks` of 50, 50 and 20; only the tasks Kling knows come back."""
    with fake_kling(api_key="key-1") as fake:
        known = [fake.add_task(T26).task_id for _ in range(110)]
        unknown = [f"unknown-{n}" for n in range(10)]
        names = known[:60] + unknown + known[60:]
        async with KlingClient(fake.base_url, api_key="key-1") as kling:
            found = await kling.query_batch(task_ids=names)

    queries = fake.batch_queries()
    assert [len(q.query["task_ids"].split(",")) for q in queries] == [BATCH_IDS, BATCH_IDS, 20]
    assert [name for q in queries for name in q.query["task_ids"].split(",")] == names
    assert sorted(task["id"] for task in found) == sorted(known)


async def test_long_ids_are_asked_in_smaller_batches_to_keep_the_url_short() -> None:
    """100-character ids fit 19 to a query: each query string stays within BATCH_URL_CHARS."""
    names = [f"{n:03d}" + "x" * 97 for n in range(60)]
    kling, seen = client(batch_echo)
    async with kling:
        found = await kling.query_batch(task_ids=names)

    assert [len(asked(r)) for r in seen] == [19, 19, 19, 3]
    assert all(len(r.url.query) <= BATCH_URL_CHARS for r in seen)
    assert [name for r in seen for name in asked(r)] == names
    assert [task["id"] for task in found] == names


async def test_the_whole_query_string_stays_within_the_limit_not_only_the_ids() -> None:
    """The limit is on what goes into the URL, the key's name included."""
    names = [f"{n:03d}" + "x" * 121 for n in range(40)]
    kling, seen = client(batch_echo)
    async with kling:
        await kling.query_batch(task_ids=names)
    assert [len(r.url.query) for r in seen if len(r.url.query) > BATCH_URL_CHARS] == []


async def test_an_id_named_twice_is_asked_for_once() -> None:
    """Duplicates are dropped before the ids are cut into batches, keeping the first's place."""
    kling, seen = client(batch_echo)
    async with kling:
        found = await kling.query_batch(external_task_ids=["kr-b", "kr-a", "kr-b"])
    (request,) = seen
    assert request.url.params["external_task_ids"] == "kr-b,kr-a"
    assert [task["id"] for task in found] == ["kr-b", "kr-a"]


@pytest.mark.parametrize(
    "kinds",
    [{}, {"task_ids": ["t1"], "external_task_ids": ["kr-1"]}],
    ids=["neither", "both"],
)
async def test_a_batch_query_names_its_tasks_by_exactly_one_kind_of_id(
    kinds: dict[str, list[str]],
) -> None:
    """Kling takes task_ids or external_task_ids, never both; neither is a mistake too."""
    kling, seen = client(batch_echo)
    async with kling:
        with pytest.raises(ValueError, match="exactly one"):
            await kling.query_batch(**kinds)
    assert seen == []


async def test_an_unsafe_id_in_a_batch_is_refused_before_any_request() -> None:
    """One bad id anywhere in the list stops the whole query, even past the first batch."""
    kling, seen = client(batch_echo)
    async with kling:
        with pytest.raises(ValueError, match="unsafe"):
            await kling.query_batch(task_ids=[f"t{n}" for n in range(60)] + ["a&task_ids=b"])
    assert seen == []


async def test_an_id_with_a_plus_sign_is_found() -> None:
    """Base64-like ids may hold `+`; the query must still name the task."""
    with fake_kling(api_key="key-1") as fake:
        task = fake.add_task(T26, external_task_id="ext+1")
        async with KlingClient(fake.base_url, api_key="key-1") as kling:
            found = await kling.query_batch(external_task_ids=["ext+1"])
    assert [t["id"] for t in found] == [task.task_id]


async def test_a_current_standard_query_goes_through_the_batch_endpoint() -> None:
    """`query` asks `GET tasks?task_ids=<id>` and falls back to the id as an external_task_id."""
    with fake_kling(api_key="key-1") as fake:
        task = fake.add_task(T26, external_task_id="kr-own-id")
        async with KlingClient(fake.base_url, api_key="key-1") as kling:
            by_id = await kling.query(T26, task.task_id)
            by_external = await kling.query(T26, "kr-own-id")

    assert by_id.data["id"] == by_external.data["id"] == task.task_id
    assert by_external.data["external_id"] == "kr-own-id"
    assert [q.query for q in fake.batch_queries()] == [
        {"task_ids": task.task_id},
        {"task_ids": "kr-own-id"},
        {"external_task_ids": "kr-own-id"},
    ]
    assert not any(r.path.startswith("/kling/v1/") for r in fake.requests)


async def test_a_current_standard_task_kling_does_not_know_is_not_found() -> None:
    """Left out of both batch answers, the task is KlingAPIError 1203 with `not_found`."""
    with fake_kling(api_key="key-1") as fake:
        fake.add_task(T26)
        async with KlingClient(fake.base_url, api_key="key-1") as kling:
            with pytest.raises(KlingAPIError) as missing:
                await kling.query(T26, "kr-nothing")

    assert missing.value.not_found and not missing.value.retryable
    assert missing.value.code == 1203
    assert [q.query for q in fake.batch_queries()] == [
        {"task_ids": "kr-nothing"},
        {"external_task_ids": "kr-nothing"},
    ]


async def test_an_old_standard_answer_whose_data_is_a_one_element_list_is_that_task() -> None:
    """Some aggregators wrap the task in a list; one element is the task, two are no answer."""
    task = fixture_json("create_response.json")["data"]
    kling, _ = client(lambda request: kling_answer([task]))
    async with kling:
        queried = await kling.query(T2V, task["task_id"])
    assert queried.data == task

    kling, _ = client(lambda request: kling_answer([task, task]))
    async with kling:
        with pytest.raises(KlingUnavailable):
            await kling.query(T2V, task["task_id"])


@pytest.mark.parametrize("data", [{"id": "t1"}, None, "t1"], ids=["object", "null", "text"])
async def test_a_batch_answer_without_a_list_of_tasks_is_unavailable(data: Any) -> None:
    """`GET tasks` must answer a list in `data`; anything else is no usable answer."""
    kling, _ = client(lambda request: kling_answer(data))
    async with kling:
        with pytest.raises(KlingUnavailable, match="list of tasks"):
            await kling.query_batch(task_ids=["t1"])
        with pytest.raises(KlingUnavailable):
            await kling.query(T26, "t1")


async def test_a_listing_sends_its_window_cursor_and_filters_and_reads_a_page() -> None:
    """`POST tasks` carries the body Kling documents; the answer becomes a Page."""
    page = {"result": [{"id": "t1"}, "not-a-task", {"id": "t2"}], "next_cursor": "c2", "count": 7}
    kling, seen = client(lambda request: kling_answer(page))
    async with kling:
        got = await kling.list_tasks(1_000, 2_000, cursor="c1")

    (request,) = seen
    assert (request.method, str(request.url)) == ("POST", "https://aggregator.example/kling/tasks")
    assert json.loads(request.content) == {
        "start_time": 1_000,
        "end_time": 2_000,
        "cursor": "c1",
        "limit": 500,
        "filters": [{"key": "status", "values": ["succeeded"]}],
    }
    assert got == Page([{"id": "t1"}, {"id": "t2"}], "c2", 7)


async def test_paging_through_the_listing_visits_every_listed_task_once() -> None:
    """With a small limit, following next_cursor to its end sees each succeeded task once."""
    start = int(time.time() * 1000) - 3_600_000
    with fake_kling(api_key="key-1") as fake:
        done = [
            fake.add_task(T26, status="succeed", created_at=start + n).task_id for n in range(7)
        ]
        fake.add_task(T26, status="processing", created_at=start + 100)
        fake.add_task(T2V, status="succeed", created_at=start + 200)
        seen: list[str] = []
        pages: list[Page] = []
        async with KlingClient(fake.base_url, api_key="key-1") as kling:
            cursor = ""
            while True:
                page = await kling.list_tasks(start, start + 10_000, cursor=cursor, limit=3)
                pages.append(page)
                seen += [task["id"] for task in page.tasks]
                if not page.next_cursor:
                    break
                cursor = page.next_cursor

    assert seen == done
    assert [len(page.tasks) for page in pages] == [3, 3, 1]
    assert {page.count for page in pages} == {7}
    assert [r.body["limit"] for r in fake.listings()] == [3, 3, 3]


@pytest.mark.parametrize(
    "data",
    [{"next_cursor": "", "count": 0}, {"result": {"id": "t1"}}, [{"id": "t1"}], None],
    ids=["no-result", "result-object", "data-list", "data-null"],
)
async def test_a_listing_without_a_result_list_is_unavailable(data: Any) -> None:
    """Only `data.result`, a list, is a page; anything else is no usable answer."""
    kling, _ = client(lambda request: kling_answer(data))
    async with kling:
        with pytest.raises(KlingUnavailable, match=r"data\.result"):
            await kling.list_tasks(0, 1)


async def test_an_unanswered_listing_is_repeated_though_it_is_a_post() -> None:
    """A listing only reads, so it is retried like a GET; a create POST still is not."""
    failures = [2]

    def flaky(request: httpx.Request) -> httpx.Response:
        if failures[0]:
            failures[0] -= 1
            raise httpx.ConnectError("connection refused", request=request)
        return kling_answer({"result": [{"id": "t1"}], "next_cursor": "", "count": 1})

    kling, seen = client(flaky, attempts=3)
    async with kling:
        page = await kling.list_tasks(0, 1)
        assert page.tasks == [{"id": "t1"}]
        assert [r.method for r in seen] == ["POST"] * 3
        failures[0] = 2
        with pytest.raises(KlingUnavailable):
            await kling.create(T26, {"prompt": "p"})
    assert len(seen) == 4
