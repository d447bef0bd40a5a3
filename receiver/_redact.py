"""URLs with their credentials taken out, for messages that echo a setting.

Settings such as S3_ENDPOINT_URL or KLING_API_BASE may carry a password in
`user:password@` or a key in the query (`?api_key=…`, `X-Amz-Signature=…`); an
error about such a setting shows the URL with those replaced by `***`, so that
it can be read in a terminal or a log without leaking them.
"""

from __future__ import annotations

import re

__all__ = ["redact_url", "redact_urls"]

HIDDEN = "***"
# A query (or fragment) parameter is secret when its name holds any of these.
_SECRET_NAME = re.compile(r"key|token|secret|sig|pass|pwd|auth|cred|session|jwt", re.IGNORECASE)
_PARAM = re.compile(r"(?P<lead>[?&#;])(?P<name>[^=&#;?]*)=(?P<value>[^&#;]*)")
# A URL inside a longer text: a scheme, then everything up to a space or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact_url(value: str) -> str:
    """`value` with the userinfo password (or a lone userinfo) and secret parameters hidden.

    It need not be a well-formed URL: a setting that is wrong for want of a scheme
    (`user:pass@host`) is redacted all the same.
    """
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        # A lone userinfo is often a token itself (https://TOKEN@host): hidden whole.
        authority = f"{user}:{HIDDEN}@{host}" if colon else f"{HIDDEN}@{host}"
    return scheme + sep + authority + _PARAM.sub(_hide_secret_param, tail)


def redact_urls(text: str) -> str:
    """`text` with every URL in it (one with a scheme) passed through `redact_url`."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group()), text)


def _hide_secret_param(match: re.Match[str]) -> str:
    if not _SECRET_NAME.search(match["name"]):
        return match.group()
    return f"{match['lead']}{match['name']}={HIDDEN}"
