"""/metrics of the real `serve` process: every series named, values that follow what happened."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from receiver import tokens
from tests.media_server import MediaServer, media_bytes
from tests.support import Service, assert_error, free_port, succeed_payload, wait_for

pytestmark = pytest.mark.e2e

T2V = "videos/text2video"
TOKEN = "e2e-metrics-token"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# Every series the README lists, as its samples are named.
SERIES = [
    "kling_receiver_deliveries_total",
    "kling_receiver_deliveries_refused_total",
    "kling_receiver_delivery_ack_seconds_bucket",
    "kling_receiver_delivery_ack_seconds_count",
    "kling_receiver_delivery_ack_seconds_sum",
    "kling_receiver_duplicate_deliveries_total",
    "kling_receiver_out_of_order_deliveries_total",
    "kling_receiver_polls_total",
    "kling_receiver_verifications_total",
    "kling_receiver_recoveries_total",
    "kling_receiver_downloads_total",
    "kling_receiver_downloaded_bytes_total",
    "kling_receiver_download_seconds_bucket",
    "kling_receiver_download_seconds_count",
    "kling_receiver_download_seconds_sum",
    "kling_receiver_storage_ready",
    "kling_receiver_ledger_up",
    "kling_receiver_unfinished_tasks",
    "kling_receiver_queued_assets",
    "kling_receiver_oldest_unfinished_task_age_seconds",
    "kling_receiver_oldest_pending_asset_age_seconds",
    "kling_receiver_asset_expiry_seconds",
    "kling_receiver_event_attempts_total",
    "kling_receiver_event_attempt_seconds_bucket",
    "kling_receiver_event_attempt_seconds_count",
    "kling_receiver_event_attempt_seconds_sum",
    "kling_receiver_expiry_warnings_total",
    "kling_receiver_undelivered_events",
    "kling_receiver_oldest_undelivered_event_age_seconds",
]


def scrape(service: Service) -> Samples:
    """GET /metrics with the token, read by Prometheus's own text parser."""
    response = httpx.get(
        service.base_url + "/metrics",
        headers={"Authorization": f"Bearer {TOKEN}"},
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in found, f"{name}{labels} not scraped"
    return found[key]


def deliver(service: Service, external: str, data: dict[str, Any]) -> None:
    data["task_info"] = {"external_task_id": external}
    url = service.callback_url(tokens.task_ref(external), T2V)
    response = httpx.post(url, content=json.dumps(data).encode(), trust_env=False)
    assert response.status_code == 200, response.text


def test_metrics_name_every_series_and_follow_what_happened(
    services: Callable[..., Service], media: MediaServer
) -> None:
    """A stored file, one that cannot be fetched yet, a task still running and an event
    endpoint that refuses connections, scraped before and after a restart: the counters say
    what this process did, the gauges what the ledger holds."""
    service = services(
        env={
            "EVENT_WEBHOOK_URLS": f"http://127.0.0.1:{free_port()}/refused",
            "ALLOW_PRIVATE_EVENT_URLS": "true",
            "ALLOW_PRIVATE_DOWNLOADS": "true",
            "DOWNLOAD_RETRY_BASE_SECONDS": "0.05",
            "DOWNLOAD_CONCURRENCY": "2",
            "METRICS_TOKEN": TOKEN,
        }
    )
    metrics_url = service.base_url + "/metrics"
    assert_error(httpx.get(metrics_url, trust_env=False), 401, "unauthorized", "METRICS_TOKEN")
    as_admin = httpx.get(metrics_url, headers=service.admin, trust_env=False)
    assert as_admin.status_code == 401  # METRICS_TOKEN is set: the admin token is not it

    body = media_bytes(200_000, 3)
    stored_url = media.add("/metrics/a.mp4", body)
    nowhere = f"http://127.0.0.1:{free_port()}/gone.mp4"  # refused: retried, never stored
    running = succeed_payload("m-running", [], T2V) | {"task_status": "processing"}
    running.pop("task_result")
    deliver(service, "kr_m_running", running)
    deliver(service, "kr_m_stored", succeed_payload("m-stored", [stored_url], T2V))
    deliver(service, "kr_m_stuck", succeed_payload("m-stuck", [nowhere], T2V))
    refused = httpx.post(service.callback_url(), content=b"{not json", trust_env=False)
    assert refused.status_code == 400
    wait_for(service.archived("m-stored"), "the file to be stored")

    def retried() -> bool:
        found = scrape(service)
        return (
            value(found, "kling_receiver_downloads_total", outcome="retry") >= 1
            and value(found, "kling_receiver_event_attempts_total", outcome="retry") >= 1
        )

    wait_for(retried, "a download and an event to be retried")
    found = scrape(service)

    named = {name for name, _ in found}
    assert [name for name in SERIES if name not in named] == []
    assert value(found, "kling_receiver_deliveries_total", outcome="moved") >= 3
    assert value(found, "kling_receiver_deliveries_refused_total", reason="bad_json") == 1
    assert value(found, "kling_receiver_delivery_ack_seconds_count") >= 4
    assert value(found, "kling_receiver_downloads_total", outcome="stored") == 1
    assert value(found, "kling_receiver_downloaded_bytes_total") == len(body)
    assert value(found, "kling_receiver_download_seconds_count", outcome="stored") == 1
    assert value(found, "kling_receiver_download_seconds_bucket", outcome="stored", le="600.0") == 1
    assert value(found, "kling_receiver_storage_ready") == 1
    assert value(found, "kling_receiver_ledger_up") == 1
    assert value(found, "kling_receiver_unfinished_tasks", status="processing") == 1
    queued = sum(
        value(found, "kling_receiver_queued_assets", state=state)
        for state in ("pending", "downloading")
    )
    assert queued == 1
    assert value(found, "kling_receiver_oldest_pending_asset_age_seconds") > 0
    running_age = value(found, "kling_receiver_oldest_unfinished_task_age_seconds")
    assert running_age > 0
    assert value(found, "kling_receiver_asset_expiry_seconds") < 30 * 24 * 3600
    assert value(found, "kling_receiver_event_attempts_total", outcome="delivered") == 0
    assert value(found, "kling_receiver_event_attempt_seconds_count") >= 1
    assert value(found, "kling_receiver_expiry_warnings_total") == 0
    undelivered = value(found, "kling_receiver_undelivered_events")
    assert undelivered >= 5  # three task.updated, one asset.stored, one task.archived at least
    assert value(found, "kling_receiver_oldest_undelivered_event_age_seconds") > 0
    task_ids = ("m-running", "m-stored", "m-stuck")
    assert not [key for key in found if any(v in task_ids for _, v in key[1])]

    # The gauges come from the ledger: a restart keeps them; the counters start again.
    service.restart()
    again = scrape(service)
    assert value(again, "kling_receiver_oldest_unfinished_task_age_seconds") >= running_age
    assert value(again, "kling_receiver_unfinished_tasks", status="processing") == 1
    assert value(again, "kling_receiver_downloads_total", outcome="stored") == 0
    assert value(again, "kling_receiver_undelivered_events") >= undelivered
