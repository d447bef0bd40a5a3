"""Standard Webhooks signatures (https://www.standardwebhooks.com), made and checked here.

A delivery carries `webhook-id`, `webhook-timestamp` (whole seconds) and
`webhook-signature`: space-separated `v1,<base64>` entries, each an HMAC-SHA256 of
`{id}.{timestamp}.{body}` under the base64 key after `whsec_` (two during a key
rotation). The headers are parsed here, not by a library, so a refusal says the same
thing whichever library release is installed.

`KLING_WEBHOOK_SECRET` may hold several secrets, newest first, separated by spaces
and/or commas: a delivery signed under any of them verifies, so an operator can roll
the secret here before (or after) Kling does without refusing a delivery.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = [
    "TOLERANCE_SECONDS",
    "SignatureError",
    "WebhookKey",
    "decode_secret",
    "decode_secrets",
    "split_secrets",
]

TOLERANCE_SECONDS = 300  # how far a timestamp may be from our clock, either way (no replays)
_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
_MALFORMED = "webhook-signature must be space-separated v1,<base64> signatures"


class SignatureError(Exception):
    """A delivery's signature headers do not prove who sent it; the message says why."""


def decode_secret(secret: str) -> bytes:
    """The key inside a `whsec_…` secret; ValueError when there is none."""
    raw = secret.removeprefix("whsec_")
    try:
        # Pad to a whole number of quanta: a padded secret plus "==" would be refused.
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ValueError("must be the whsec_... secret from Kling (base64 after the prefix)")
    return key


def split_secrets(text: str) -> list[str]:
    """The secrets in a KLING_WEBHOOK_SECRET value, in order; ValueError if none or one is empty.

    Spaces and commas both separate, so `new,old`, `new old` and `new, old` are alike;
    an empty place (two commas in a row, a comma at either end) is refused rather than
    skipped, since it usually means a secret went missing while the value was edited.
    """
    if not text.strip():
        raise ValueError(
            "holds only spaces; set the whsec_... secret from Kling, or leave it empty to accept "
            "unsigned callbacks"
        )
    found: list[str] = []
    for piece in text.split(","):
        words = piece.split()
        if not words:
            raise ValueError(
                f"secret {len(found) + 1} is empty (two commas in a row, or a comma at "
                "either end); separate the whsec_... secrets with spaces or one comma"
            )
        found += words
    return found


def decode_secrets(text: str) -> list[bytes]:
    """The keys of a KLING_WEBHOOK_SECRET value, newest first; ValueError naming the bad one.

    A secret is named by its place in the list, never by its text, so the error can be
    logged; the same key listed twice is refused as a likely copy-paste slip.
    """
    secrets = split_secrets(text)
    keys: list[bytes] = []
    for position, secret in enumerate(secrets, 1):
        try:
            key = decode_secret(secret)
        except ValueError as exc:
            if len(secrets) == 1:
                raise
            raise ValueError(f"secret {position} of {len(secrets)} {exc}") from None
        if key in keys:
            raise ValueError(
                f"secrets {keys.index(key) + 1} and {position} are the same key; list each once"
            )
        keys.append(key)
    return keys


class WebhookKey:
    """The `whsec_…` secrets of KLING_WEBHOOK_SECRET: the first (newest) signs, any verifies."""

    def __init__(self, secrets: str) -> None:
        self._keys = decode_secrets(secrets)

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The `webhook-signature` header value for this message."""
        digest = _digest(self._keys[0], msg_id, str(timestamp), body)
        return "v1," + base64.b64encode(digest).decode()

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
        """Return if a `v1` signature in `headers` matches `body` under any secret; else raise."""
        missing = [name for name in _HEADERS if not headers.get(name)]
        if missing:
            noun = "header is" if len(missing) == 1 else "headers are"
            raise SignatureError(f"the {', '.join(missing)} {noun} missing")
        msg_id, stamp, header = (headers[name] for name in _HEADERS)
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            raise SignatureError("webhook-timestamp must be whole seconds since 1970")
        skew = int(stamp) - (time.time() if now is None else now)
        if skew < -TOLERANCE_SECONDS:
            raise SignatureError("the webhook-timestamp is too old (over 5 minutes ago)")
        if skew > TOLERANCE_SECONDS:
            raise SignatureError("the webhook-timestamp is too new (over 5 minutes ahead)")
        expected = [_digest(key, msg_id, stamp, body) for key in self._keys]
        # Every entry is compared with every key, without stopping at a match: a malformed
        # entry is named even beside a good one, and the time taken tells no one which matched.
        matched = False
        for entry in header.split():
            version, comma, encoded = entry.partition(",")
            if not comma or not version:
                raise SignatureError(_MALFORMED)
            if version != "v1":
                continue  # another scheme (v1a is asymmetric): not ours to check
            signature = _signature(encoded)
            for digest in expected:
                matched |= hmac.compare_digest(digest, signature)
        if not matched:
            raise SignatureError("no v1 signature matches this body under KLING_WEBHOOK_SECRET")


def _digest(key: bytes, msg_id: str, stamp: str, body: bytes) -> bytes:
    """The HMAC-SHA256 that a `v1` signature of this message under `key` carries."""
    return hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()


def _signature(encoded: str) -> bytes:
    """The 32 bytes of one `v1` signature, or SignatureError."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != hashlib.sha256().digest_size:
        raise SignatureError(_MALFORMED)
    return raw
