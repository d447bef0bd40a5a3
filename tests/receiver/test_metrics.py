"""GET /metrics: who may scrape it, what each delivery counts, and the ledger's gauges."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from starlette.testclient import TestClient

from receiver import tokens
from receiver.app import create_app
from receiver.ledger import Backlog, LedgerUnavailable
from receiver.metrics import REFUSALS, Metrics, scrape
from receiver.routes import callbacks
from receiver.settings import Settings
from tests.support import ADMIN_TOKEN, CALLBACK_SECRET, assert_error, fixture_bytes

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TASK_ID = "867283741759111202"  # the text2video fixtures' task
T2V = "videos/text2video"


@pytest.fixture
def client(settings: Settings, ledger_url: str) -> Iterator[TestClient]:
    """The app on each ledger backend: the gauges read the same from SQLite and PostgreSQL."""
    with TestClient(create_app(settings.model_copy(update={"database_url": ledger_url}))) as c:
        yield c


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels, as Prometheus's own parser reads it."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def scraped(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(response.text)


def deliver(client: TestClient, body: bytes, ref: str = "x-kr_01JDX3N5Q8") -> int:
    path = tokens.callback_path(CALLBACK_SECRET, ref, T2V)
    return client.post(path, content=body).status_code


def test_metrics_need_the_token(settings: Settings) -> None:
    """Without the bearer token, or with a wrong one, /metrics is a 401 naming METRICS_TOKEN."""
    with TestClient(create_app(settings)) as client:
        assert_error(client.get("/metrics"), 401, "unauthorized", "METRICS_TOKEN")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(client.get("/metrics", headers=wrong), 401, "unauthorized")
        assert client.get("/metrics", headers=ADMIN).status_code == 200


def test_metrics_token_replaces_the_admin_token_there(settings: Settings) -> None:
    """With METRICS_TOKEN set, it opens /metrics and the admin token no longer does."""
    own = settings.model_copy(update={"metrics_token": SecretStr("scraper-token")})
    with TestClient(create_app(own)) as client:
        assert client.get("/metrics", headers=ADMIN).status_code == 401
        scraper = {"Authorization": "Bearer scraper-token"}
        assert client.get("/metrics", headers=scraper).status_code == 200
        assert client.get("/api/tasks", headers=scraper).status_code == 401


def test_deliveries_are_counted_by_outcome_and_refusal(client: TestClient) -> None:
    """Moved, duplicate, out of order and refused deliveries each count, and each is timed."""
    before = scraped(client)
    assert value(before, "kling_receiver_deliveries_total", outcome="moved") == 0

    processing = fixture_bytes("callback_text2video_processing.json")
    assert deliver(client, processing) == 200
    assert deliver(client, processing) == 200  # the same bytes again
    assert deliver(client, fixture_bytes("callback_text2video_submitted.json")) == 200  # late
    assert deliver(client, b"{not json") == 400
    assert client.post(tokens.CALLBACK_PREFIX + "/x-nope/bad-signature").status_code == 404

    found = scraped(client)
    assert value(found, "kling_receiver_deliveries_total", outcome="moved") == 1
    assert value(found, "kling_receiver_deliveries_total", outcome="duplicate") == 1
    assert value(found, "kling_receiver_deliveries_total", outcome="kept") == 1
    assert value(found, "kling_receiver_duplicate_deliveries_total") == 1
    assert value(found, "kling_receiver_out_of_order_deliveries_total") == 1
    refused = "kling_receiver_deliveries_refused_total"
    assert value(found, refused, reason="bad_json") == 1
    assert value(found, refused, reason="unknown_callback_url") == 1
    assert value(found, "kling_receiver_delivery_ack_seconds_count") == 5
    assert value(found, "kling_receiver_delivery_ack_seconds_bucket", le="+Inf") == 5
    # Task ids never become labels.
    assert not [key for key in found if any(TASK_ID in v for _, v in key[1])]


def test_gauges_come_from_the_ledger(client: TestClient) -> None:
    """A succeed with a file not yet downloaded: no unfinished task, one pending asset that
    ages, and an expiry 30 days after Kling created the task."""
    empty = scraped(client)
    assert value(empty, "kling_receiver_ledger_up") == 1
    assert value(empty, "kling_receiver_queued_assets", state="pending") == 0
    assert value(empty, "kling_receiver_oldest_pending_asset_age_seconds") == 0
    assert value(empty, "kling_receiver_asset_expiry_seconds") is None
    assert value(empty, "kling_receiver_storage_ready") is None  # this app downloads nothing

    assert deliver(client, fixture_bytes("callback_text2video_processing.json")) == 200
    found = scraped(client)
    assert value(found, "kling_receiver_unfinished_tasks", status="processing") == 1
    age = value(found, "kling_receiver_oldest_unfinished_task_age_seconds")
    assert age is not None and 0 <= age < 60

    succeed = fixture_bytes("callback_text2video_succeed.json")
    assert deliver(client, succeed) == 200
    found = scraped(client)
    assert value(found, "kling_receiver_unfinished_tasks", status="processing") is None
    assert value(found, "kling_receiver_oldest_unfinished_task_age_seconds") == 0
    assert value(found, "kling_receiver_queued_assets", state="pending") == 1
    age = value(found, "kling_receiver_oldest_pending_asset_age_seconds")
    assert age is not None and 0 <= age < 60
    created_ms = json.loads(succeed)["created_at"]
    expiry = value(found, "kling_receiver_asset_expiry_seconds")
    expected = created_ms / 1000 + 30 * 24 * 3600 - time.time()
    assert expiry is not None and abs(expiry - expected) < 60


class AwayLedger:
    async def backlog(self) -> Backlog:
        raise LedgerUnavailable("the database did not answer")


class SlowLedger:
    async def backlog(self) -> Backlog:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


@pytest.mark.parametrize("ledger", [AwayLedger(), SlowLedger()], ids=["away", "slow"])
def test_a_ledger_that_does_not_answer_leaves_its_gauges_out(ledger: Any) -> None:
    """The scrape still answers, promptly, with the counters and ledger_up 0."""
    started = time.monotonic()
    text = asyncio.run(scrape(Metrics(), ledger, storage_ready=False, ledger_wait=0.05))
    assert time.monotonic() - started < 5
    found = samples(text.decode())
    assert value(found, "kling_receiver_ledger_up") == 0
    assert value(found, "kling_receiver_queued_assets", state="pending") is None
    assert value(found, "kling_receiver_storage_ready") == 0
    assert value(found, "kling_receiver_deliveries_total", outcome="moved") == 0


def test_every_refusal_code_has_its_series_from_the_start() -> None:
    """Each code the callback endpoint refuses with is a label shown at 0 before any refusal."""
    tree = ast.parse(inspect.getsource(callbacks))
    codes = {
        call.args[3].value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "_refuse"
        and isinstance(call.args[3], ast.Constant)
    }
    assert codes and codes == set(REFUSALS)
