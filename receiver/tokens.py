"""Callback URLs are the credential: each carries an HMAC of its reference under CALLBACK_SECRET.

A URL looks like ``{PUBLIC_URL}/callbacks/kling/{ref}/{sig}[/{action}]``:

- ``ref`` is ``x-{external_task_id}`` for a URL made for one task (the service's
  own submissions, or ``callback-url --external-task-id``), or ``h-{random}`` for a
  URL made by hand that several tasks may share (``callback-url``);
- ``action`` (``videos/text2video``, ``text-to-video/kling-2.6``…) tells the service
  how to query the task later;
- ``sig`` signs ref and action together, so neither can be changed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from receiver.models import ACTION_PATTERN, TASK_ID_PATTERN, CallbackRef

__all__ = [
    "CALLBACK_PREFIX",
    "CallbackRef",
    "callback_path",
    "new_channel_ref",
    "task_ref",
    "verify",
]

CALLBACK_PREFIX = "/callbacks/kling"
_SIG_CHARS = 32  # 192 bits of HMAC-SHA256, base64url


def task_ref(external_task_id: str) -> str:
    """The reference of a URL that belongs to one task."""
    if not TASK_ID_PATTERN.fullmatch(external_task_id):
        raise ValueError(f"unsafe external_task_id {external_task_id!r}")
    return f"x-{external_task_id}"


def new_channel_ref() -> str:
    """A fresh reference for a hand-made URL."""
    return "h-" + secrets.token_hex(10)


def callback_path(secret: str, ref: str, action: str | None = None) -> str:
    """The signed path (without the base URL) for a reference and an optional action."""
    if action is not None and not ACTION_PATTERN.fullmatch(action):
        raise ValueError(
            "action must be an old-standard 'videos/text2video' or a current "
            f"'text-to-video/kling-2.6', got {action!r}"
        )
    path = f"{CALLBACK_PREFIX}/{ref}/{_sign(secret, ref, action)}"
    return f"{path}/{action}" if action else path


def verify(secret: str, ref: str, sig: str, action: str | None) -> CallbackRef | None:
    """The reference if the signature is right (constant-time), else None."""
    if action is not None and not ACTION_PATTERN.fullmatch(action):
        return None
    if not _valid_ref(ref):
        return None
    expected = _sign(secret, ref, action)
    if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
        return None
    return CallbackRef(ref, action)


def _valid_ref(ref: str) -> bool:
    return ref[:2] in ("x-", "h-") and TASK_ID_PATTERN.fullmatch(ref[2:]) is not None


def _sign(secret: str, ref: str, action: str | None) -> str:
    message = f"kling-receiver callback v1\n{ref}\n{action or ''}".encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()[:_SIG_CHARS]
