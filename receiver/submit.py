"""Submitting a task through the service: checked, recorded, then sent with its own callback URL.

The task is recorded before Kling is called, under an `external_task_id` the
service generates, so that a crash between the two leaves a submission the
poller can reconcile rather than a task nobody knows about.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from receiver import tokens
from receiver.kling import KlingAPIError, KlingClient, KlingUnavailable
from receiver.ledger import Ledger, Submission
from receiver.models import (
    ACTION_PATTERN,
    CallbackRef,
    PayloadError,
    Source,
    Standard,
    TaskRecord,
)
from receiver.poller import poll_after, update_from_reply
from receiver.settings import Settings

__all__ = ["SubmitError", "check_params", "create_body", "submit"]

MAX_PROMPT = 2500
MODES = ("std", "pro")
_SET_BY_SERVICE = ("callback_url", "external_task_id")


@dataclass
class SubmitError(Exception):
    """A submission that did not become a task; `message` is a sentence for the caller."""

    status_code: int
    code: str
    message: str
    kling_code: int | None = None
    request_id: str | None = None

    def __str__(self) -> str:
        return self.message

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.kling_code is not None:
            body |= {"kling_code": self.kling_code, "request_id": self.request_id}
        return body


def check_params(action: object, params: object) -> tuple[str, dict[str, Any]]:
    """The parameters, or `SubmitError` (422) for mistakes worth catching before a slot is spent."""
    if not isinstance(action, str) or not ACTION_PATTERN.fullmatch(action):
        raise _refuse(
            "action must be an old-standard action/action2 pair such as videos/text2video, "
            "or a current product/model path such as text-to-video/kling-2.6."
        )
    if not isinstance(params, dict):
        raise _refuse("params must be a JSON object of the create request's fields.")
    if Standard.of(action) is Standard.old:
        _check_old(params)
    else:
        _check_new(params)
    return action, params


def _refuse(message: str) -> SubmitError:
    return SubmitError(422, "bad_params", message)


def _check_old(params: dict[str, Any]) -> None:
    """The v1 standard: flat fields (some actions nest them in `input`), durations as text."""
    _not_ours(params, "")
    nested = params.get("input")
    for fields in (params, nested if isinstance(nested, dict) else {}):
        _check_prompts(fields)
        duration = fields.get("duration")
        if duration is not None and not (isinstance(duration, str) and duration.isdigit()):
            raise _refuse('duration must be a string of digits, such as "5" or "10".')
        mode = fields.get("mode")
        if mode is not None and mode not in MODES:
            raise _refuse(f"mode must be one of {', '.join(MODES)}, not {mode!r}.")


def _check_new(params: dict[str, Any]) -> None:
    """The current standard: `settings` and `options` objects, durations as integers."""
    _not_ours(params, "")
    _check_prompts(params)
    for name in ("settings", "options"):
        if params.get(name) is not None and not isinstance(params[name], dict):
            raise _refuse(f"{name} must be a JSON object.")
    _not_ours(params.get("options") or {}, "options.")
    duration = (params.get("settings") or {}).get("duration")
    if duration is not None and (not isinstance(duration, int) or isinstance(duration, bool)):
        raise _refuse("settings.duration must be an integer number of seconds, such as 5 or 10.")


def _not_ours(fields: dict[str, Any], where: str) -> None:
    for name in _SET_BY_SERVICE:
        if name in fields:
            raise _refuse(f"{where}{name} is set by the service; leave it out of params.")


def _check_prompts(fields: dict[str, Any]) -> None:
    for name in ("prompt", "negative_prompt"):
        value = fields.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_PROMPT):
            raise _refuse(f"{name} must be text of at most {MAX_PROMPT} characters.")


def create_body(
    action: str, params: dict[str, Any], callback_url: str, external_task_id: str
) -> dict[str, Any]:
    """The create request: the caller's params with the service's callback URL and id,
    where the action's standard wants them (top level in the old one, `options` now)."""
    ours = {"callback_url": callback_url, "external_task_id": external_task_id}
    if Standard.of(action) is Standard.old:
        return params | ours
    return params | {"options": (params.get("options") or {}) | ours}


async def submit(
    ledger: Ledger,
    client: KlingClient,
    settings: Settings,
    action: object,
    params: object,
    idempotency_key: str | None = None,
) -> tuple[TaskRecord, bool]:
    """Submit a task; returns it and whether it is new (False: an idempotent replay)."""
    action, params = check_params(action, params)
    external_task_id = "kr-" + uuid.uuid4().hex
    recorded, new = await ledger.record_submission(
        action, params, external_task_id, idempotency_key
    )
    if not new:
        return await _replay(ledger, recorded, action, params), False
    ref = tokens.task_ref(external_task_id)
    path = tokens.callback_path(settings.secret("callback_secret"), ref, action)
    body = create_body(action, params, settings.public_url + path, external_task_id)
    try:
        reply = await client.create(action, body)
    except KlingAPIError as exc:
        if exc.maybe_done:
            raise _unanswered(external_task_id, exc) from exc
        reason = f"Kling refused the task (code {exc.code}): {exc.message}"
        await ledger.submission_failed(external_task_id, "refused", reason)
        status = exc.http_status if 400 <= exc.http_status < 500 else 502
        raise SubmitError(status, "kling_refused", reason + ".", exc.code, exc.request_id) from exc
    except KlingUnavailable as exc:
        raise _unanswered(external_task_id, exc) from exc
    try:
        update = update_from_reply(
            reply.data,
            Source.submit,
            action,
            archive_watermarked=settings.archive_watermarked,
            ref=CallbackRef(ref, action),
            poll_after=poll_after(settings, action),
        )
    except PayloadError as exc:
        raise SubmitError(502, "kling_unreadable", f"Kling's answer was not a task: {exc}") from exc
    await ledger.apply(update)
    task = await ledger.task(update.task.task_id)
    assert task is not None
    return task, True


def _unanswered(external_task_id: str, exc: Exception) -> SubmitError:
    """The create may have gone through: the poller reconciles it by its external_task_id."""
    return SubmitError(
        504,
        "kling_unavailable",
        f"Kling did not answer ({exc}); the submission {external_task_id} will be "
        "reconciled, and submitting again with the same Idempotency-Key is safe.",
    )


async def _replay(
    ledger: Ledger, earlier: Submission, action: str, params: dict[str, Any]
) -> TaskRecord:
    if (earlier.action, earlier.params) != (action, params):
        raise SubmitError(
            422,
            "idempotency_key_reused",
            "This Idempotency-Key was used for a different submission.",
        )
    task = None if earlier.task_id is None else await ledger.task(earlier.task_id)
    if task is not None:
        return task
    if earlier.state == "pending":
        raise SubmitError(
            409,
            "submission_in_progress",
            f"The submission {earlier.external_task_id} with this Idempotency-Key has no answer "
            "from Kling yet; try again shortly.",
        )
    raise SubmitError(
        422, "submission_failed", earlier.error or "This submission did not become a task."
    )
