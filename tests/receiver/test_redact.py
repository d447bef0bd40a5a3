"""redact_url and redact_urls: credentials out, everything else as it was."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver._redact import redact_url, redact_urls


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://api.klingai.com", "https://api.klingai.com"),
        ("https://u:p@h:9000/x?y=1", "https://u:***@h:9000/x?y=1"),
        ("https://tok@h/", "https://***@h/"),
        ("https://u:p:q@w@h", "https://u:***@h"),  # the host is after the last @
        ("u:p@h", "u:***@h"),
        ("https://h/p?api_key=k&x=1&Token=t", "https://h/p?api_key=***&x=1&Token=***"),
        (
            "https://h/?X-Amz-Credential=c&X-Amz-Signature=s",
            "https://h/?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("https://h/#access_token=t&state=s", "https://h/#access_token=***&state=s"),
        ("https://h/a@b", "https://h/a@b"),  # an @ in the path is no userinfo
        ("minio.internal:9000", "minio.internal:9000"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_urls_finds_urls_in_a_sentence() -> None:
    text = "bad (got 'ftp://u:p@h/?sig=s'); also see https://docs.example/a?b=c."
    assert (
        redact_urls(text)
        == "bad (got 'ftp://u:***@h/?sig=***'); also see https://docs.example/a?b=c."
    )


@given(st.text())
def test_redaction_is_idempotent(text: str) -> None:
    once = redact_urls(text)
    assert redact_urls(once) == once
    assert redact_url(redact_url(text)) == redact_url(text)
