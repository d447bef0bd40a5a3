"""Standard Webhooks signatures (https://www.standardwebhooks.com), made and checked here.

A delivery carries `webhook-id`, `webhook-timestamp` (whole seconds) and
`webhook-signature`: space-separated `v1,<base64>` entries, each an HMAC-SHA256 of
`{id}.{timestamp}.{body}` under the base64 key after `whsec_` (two during a key
rotation). The headers are parsed here, not by a library, so a refusal says the same
thing whichever library release is installed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = ["TOLERANCE_SECONDS", "SignatureError", "WebhookKey", "decode_secret"]

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


class WebhookKey:
    """One `whsec_…` secret, which signs and verifies deliveries."""

    def __init__(self, secret: str) -> None:
        self._key = decode_secret(secret)

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The `webhook-signature` header value for this message."""
        return "v1," + base64.b64encode(self._digest(msg_id, str(timestamp), body)).decode()

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
        """Return if one `v1` signature in `headers` matches `body`; else SignatureError."""
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
        expected = self._digest(msg_id, stamp, body)
        # Every entry is looked at, so a malformed one is named even beside a good one.
        matched = False
        for entry in header.split():
            version, comma, encoded = entry.partition(",")
            if not comma or not version:
                raise SignatureError(_MALFORMED)
            if version != "v1":
                continue  # another scheme (v1a is asymmetric): not ours to check
            matched |= hmac.compare_digest(expected, _signature(encoded))
        if not matched:
            raise SignatureError("no v1 signature matches this body under KLING_WEBHOOK_SECRET")

    def _digest(self, msg_id: str, stamp: str, body: bytes) -> bytes:
        return hmac.new(self._key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()


def _signature(encoded: str) -> bytes:
    """The 32 bytes of one `v1` signature, or SignatureError."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != hashlib.sha256().digest_size:
        raise SignatureError(_MALFORMED)
    return raw
