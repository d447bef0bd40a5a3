"""Dashboard sessions: a signed cookie from the admin token, and CSRF tokens tied to it.

A session is `{expires}.{nonce}.{signature}`, an HMAC under a key derived from
ADMIN_TOKEN: no server state, and rotating the token signs everyone out. Each
form carries an HMAC of the session's nonce, so a page of another site cannot
post one (SameSite=Strict already keeps the cookie from its requests). The
sign-in form, before any session, is tied the same way to a short-lived
cookie of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

__all__ = ["SESSION_COOKIE", "SESSION_SECONDS", "SIGNIN_COOKIE", "SIGNIN_SECONDS", "Sessions"]

SESSION_COOKIE = "kr_session"
SIGNIN_COOKIE = "kr_signin"
SESSION_SECONDS = 12 * 3600
SIGNIN_SECONDS = 3600


class Sessions:
    """Issues and checks session cookies and CSRF tokens for one admin token."""

    def __init__(self, admin_token: str, *, secure: bool) -> None:
        self._token = admin_token.encode()
        self._key = hmac.new(self._token, b"kling-receiver dashboard v1", hashlib.sha256).digest()
        self.secure = secure  # the cookies are `Secure` when PUBLIC_URL is https

    def is_admin_token(self, given: str) -> bool:
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._token)

    def issue(self, purpose: str, seconds: int, now: float | None = None) -> str:
        """A new signed value for `purpose` (`session` or `signin`) lasting `seconds`."""
        expires = int(time.time() if now is None else now) + seconds
        payload = f"{expires}.{secrets.token_urlsafe(18)}"
        return f"{payload}.{self._sign(purpose, payload)}"

    def open(self, purpose: str, value: str | None, now: float | None = None) -> str | None:
        """The nonce of a valid, unexpired value issued for `purpose`, else None."""
        if not value or value.count(".") != 2:
            return None
        payload, _, signature = value.rpartition(".")
        expected = self._sign(purpose, payload)
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            return None
        expires, _, nonce = payload.partition(".")
        if not expires.isdigit() or int(expires) < (time.time() if now is None else now):
            return None
        return nonce

    def csrf(self, nonce: str) -> str:
        """The form token of the session (or sign-in) whose nonce this is."""
        return self._sign("csrf", nonce)

    def csrf_ok(self, nonce: str, given: object) -> bool:
        return isinstance(given, str) and hmac.compare_digest(
            self.csrf(nonce).encode(), given.encode("utf-8", "replace")
        )

    def _sign(self, purpose: str, payload: str) -> str:
        message = f"{purpose}\n{payload}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()
