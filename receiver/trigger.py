"""`kling-receiver trigger`: realistic sample callbacks sent to a running service.

A person wiring Kling up sees the whole flow without Kling: a callback in either body
standard, to a callback URL signed with this service's CALLBACK_SECRET (and with a
Standard Webhooks signature when KLING_WEBHOOK_SECRET is set), for the sample files the
service serves itself (`receiver.samples`) or files at URLs given, then the task
followed through the API until its files are stored.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from receiver import tokens
from receiver.samples import SAMPLES, SAMPLES_PATH
from receiver.settings import Settings
from receiver.shapes import kind_by_suffix
from receiver.webhooks import WebhookKey

__all__ = ["KINDS", "STATUSES", "TriggerError", "callback_body", "trigger"]

KINDS = tuple(SAMPLES)
STATUSES = ("submitted", "processing", "succeed", "succeeded", "failed")
DEFAULT_ACTIONS = {"old": "videos/text2video", "new": "text-to-video/kling-2.6"}


class TriggerError(Exception):
    """What stopped a trigger, said for a person."""


@dataclass(frozen=True)
class File:
    kind: str
    url: str


def callback_body(
    body_format: str, status: str, task_id: str, external_id: str, files: list[File]
) -> dict[str, Any]:
    """A callback as Kling sends it, in the old (`task_status`) or new (`status`) standard."""
    now = int(time.time() * 1000)
    failed = status == "failed"
    message = "Sample failure sent by kling-receiver trigger" if failed else ""
    if body_format == "old":
        body: dict[str, Any] = {
            "task_id": task_id,
            "task_status": status,
            "task_status_msg": message,
            "created_at": now - 60_000,
            "updated_at": now,
            "task_info": {"external_task_id": external_id},
        }
        if files:
            videos = [f for f in files if f.kind == "video"]
            images = [f for f in files if f.kind == "image"]
            body["task_result"] = {
                "videos": [
                    {"id": f"{task_id}_{i}", "url": f.url, "duration": "3.0"}
                    for i, f in enumerate(videos)
                ],
                "images": [{"index": i, "url": f.url} for i, f in enumerate(images)],
            }
        return body
    outputs: list[dict[str, Any]] = []
    audio = [f for f in files if f.kind == "audio"]
    for i, f in enumerate(f for f in files if f.kind != "audio"):
        if f.kind == "video":
            outputs.append(
                {"type": "video", "id": f"{task_id}_{i}", "url": f.url, "duration": "3.0"}
            )
        else:
            outputs.append({"type": "image", "url": f.url})
    if audio:
        by_suffix = {urlsplit(f.url).path.lower().rsplit(".", 1)[-1]: f.url for f in audio}
        outputs.append(
            {
                "type": "audio",
                "id": f"{task_id}_a",
                "mp3_url": by_suffix.get("mp3", audio[0].url),
                "wav_url": by_suffix.get("wav"),
                "mp3_duration": "2.0",
            }
        )
    return {
        "id": task_id,
        "status": status,
        "message": message,
        "create_time": now - 60_000,
        "update_time": now,
        "external_id": external_id,
        "outputs": outputs,
        "billing": [{"charge_type": "video", "amount": "1", "currency": "unit"}],
    }


@dataclass
class Request:
    status: str
    body_format: str
    action: str
    kinds: list[str]
    urls: list[str]
    task_id: str | None
    to: str | None
    wait: float


def _spelled(status: str, body_format: str) -> str:
    """A status as the standard writes it: `succeed` in the old one, `succeeded` in the new."""
    if status in ("succeed", "succeeded"):
        return "succeed" if body_format == "old" else "succeeded"
    return status


async def trigger(settings: Settings, request: Request, say: Callable[[str], None] = print) -> int:
    """Send one sample callback, then follow the task until its files are stored."""
    if request.body_format == "old" and "audio" in request.kinds:
        raise TriggerError("the old standard's callbacks carry no audio: use --format new")
    status = _spelled(request.status, request.body_format)
    task_id = request.task_id or str(secrets.randbelow(9 * 10**17) + 10**17)
    external_id = f"trigger-{task_id}"
    base = (request.to or settings.public_url).rstrip("/")
    path = tokens.callback_path(
        settings.secret("callback_secret"), tokens.task_ref(external_id), request.action
    )
    with_files = status == _spelled("succeed", request.body_format)
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        files = [File(kind_by_suffix(url).value, url) for url in request.urls]
        if with_files and not files:
            files = [
                File(kind, f"{base}{SAMPLES_PATH}{name}")
                for kind in request.kinds
                for name in SAMPLES[kind]
            ]
        body = json.dumps(
            callback_body(
                request.body_format, status, task_id, external_id, files if with_files else []
            )
        ).encode()
        headers = {"content-type": "application/json"}
        if settings.kling_webhook_secret is not None:
            msg_id, stamp = f"trigger_{secrets.token_hex(8)}", int(time.time())
            key = WebhookKey(settings.kling_webhook_secret.get_secret_value())
            headers |= {
                "webhook-id": msg_id,
                "webhook-timestamp": str(stamp),
                "webhook-signature": key.sign(msg_id, stamp, body),
            }
        try:
            answer = await client.post(base + path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise TriggerError(
                f"no service answered at {base}: {exc or type(exc).__name__}"
            ) from exc
        standard = f"{request.body_format} standard"
        say(f"sent {status} ({standard}) for task {task_id}: HTTP {answer.status_code}")
        if answer.status_code != 200:
            say(answer.text)
            return 1
        if not (with_files and files and request.wait > 0):
            return 0
        return await _follow(client, settings, base, task_id, request.wait, say)


async def _follow(
    client: httpx.AsyncClient,
    settings: Settings,
    base: str,
    task_id: str,
    seconds: float,
    say: Callable[[str], None],
) -> int:
    """Watch the task through the API until its files are stored (or one fails for good)."""
    auth = {"authorization": f"Bearer {settings.secret('admin_token')}"}
    interactive = sys.stderr.isatty()
    deadline = time.monotonic() + seconds
    shown = ""
    while time.monotonic() < deadline:
        answer = await client.get(f"{base}/api/tasks/{task_id}", headers=auth)
        if answer.status_code == 200:
            task = answer.json()
            assets = task["assets"]
            stored = sum(a["state"] == "stored" for a in assets)
            line = f"stored {stored} of {len(assets)} files"
            if line != shown and interactive:
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
            shown = line
            if task["archived"]:
                if interactive:
                    print(file=sys.stderr)
                say(f"task {task_id} archived: {len(assets)} files stored")
                for asset in assets:
                    say(f"  {asset['kind']:<6} {asset['size']:>9} bytes  {asset['location']}")
                return 0
            errors = [a["error"] for a in assets if a["error"]]
            if errors and any(a["state"] == "failed" for a in assets):
                if interactive:
                    print(file=sys.stderr)
                raise TriggerError(
                    f"the service could not store the files: {errors[0]} (it fetches samples "
                    f"from its own PUBLIC_URL, {base}; --to names it, or --url gives files "
                    "it can reach)"
                )
        await asyncio.sleep(0.5)
    if interactive:
        print(file=sys.stderr)
    say(f"task {task_id}: {shown or 'not shown by the API'} after {seconds:g} s")
    return 1
