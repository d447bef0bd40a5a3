"""Short-lived links to archived files that the service serves itself (local storage).

A link is `{PUBLIC_URL}/files/{payload}.{sig}`: the payload names the file and
when the link expires, the signature is an HMAC of it under CALLBACK_SECRET in
a domain of its own, so no callback URL can pass for a link or the reverse.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

__all__ = ["FILES_PREFIX", "file_link", "open_link"]

FILES_PREFIX = "/files"


def file_link(secret: str, location: str, expires_at: int) -> str:
    """The path (without the base URL) of a link to `location` valid until `expires_at`."""
    payload = _b64(f"{expires_at}\n{location}".encode())
    return f"{FILES_PREFIX}/{payload}.{_sign(secret, payload)}"


def open_link(secret: str, token: str, now: float | None = None) -> str | None:
    """The location a link names, if its signature is right and it has not expired."""
    payload, _, sig = token.partition(".")
    if not hmac.compare_digest(_sign(secret, payload).encode(), sig.encode("utf-8", "replace")):
        return None
    try:
        expires, _, location = _unb64(payload).decode().partition("\n")
        expires_at = int(expires)
    except ValueError:
        return None
    if expires_at < (time.time() if now is None else now) or not location:
        return None
    return location


def _sign(secret: str, payload: str) -> str:
    message = f"kling-receiver file link v1\n{payload}".encode()
    return _b64(hmac.new(secret.encode(), message, hashlib.sha256).digest())[:43]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
