"""The event receiver refuses, fails and delivers on demand, on one port, and keeps only
requests whose signature verifies."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.event_receiver import event_receiver
from tests.support import EVENT_WEBHOOK_SECRET


def send(url: str, msg_id: str, task_id: str, secret: str = EVENT_WEBHOOK_SECRET) -> httpx.Response:
    """POST an event signed under `secret` by the reference library."""
    body = json.dumps({"type": "task.updated", "timestamp": "t", "data": {"task_id": task_id}})
    now = datetime.now(UTC)
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
        "content-type": "application/json",
    }
    return httpx.post(url, content=body, headers=headers, trust_env=False, timeout=5)


def test_modes_switch_on_one_port_and_forgeries_are_kept_apart() -> None:
    """Down refuses connections; 500 and 200 are answered and recorded in order with the
    event's id, type and task; down again refuses on the same port; a request signed
    under another secret is answered 401 and kept in `rejected` only."""
    other = "whsec_" + "b3RoZXItc2VjcmV0LW9mLXRoaXJ0eS10d28tYnl0ZXMh"
    with event_receiver(EVENT_WEBHOOK_SECRET, up=False) as receiver:
        url = receiver.url
        with pytest.raises(httpx.ConnectError):
            send(url, "msg_1", "t1")
        receiver.answer(500, {"Retry-After": "7"})
        failed = send(url, "msg_1", "t1")
        assert (failed.status_code, failed.headers["retry-after"]) == (500, "7")
        receiver.answer(200)
        assert send(url, "msg_1", "t1").status_code == 200
        assert send(url, "msg_2", "t2", secret=other).status_code == 401
        receiver.down()
        with pytest.raises(httpx.ConnectError):
            send(url, "msg_3", "t3")
        receiver.answer(200)
        assert (receiver.url, send(url, "msg_3", "t3").status_code) == (url, 200)
        receiver.wait_until(lambda r: len(r.received) == 3, "three requests", 1)

        assert receiver.summary() == [
            ("t1", "task.updated", "msg_1", 500),
            ("t1", "task.updated", "msg_1", 200),
            ("t3", "task.updated", "msg_3", 200),
        ]
        assert [r.msg_id for r in receiver.delivered()] == ["msg_1", "msg_3"]
        assert [r.msg_id for r in receiver.failed()] == ["msg_1"]
        (forged,) = receiver.rejected
        assert forged[0]["webhook-id"] == "msg_2"
        assert receiver.received[0].at <= receiver.received[1].at <= time.monotonic()
