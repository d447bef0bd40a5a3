"""File extensions: the Content-Type first, the URL's suffix next, `.bin` last."""

from __future__ import annotations

import pytest

from storage import extension


@pytest.mark.parametrize(
    ("content_type", "url", "expected"),
    [
        ("video/mp4", "https://cdn.example.com/v.png", ".mp4"),
        ("Video/MP4; codecs=avc1", "https://cdn.example.com/v", ".mp4"),
        ("image/jpeg", "https://cdn.example.com/i.jpeg", ".jpg"),
        ("image/png", "https://cdn.example.com/i", ".png"),
        ("video/quicktime", "https://cdn.example.com/v.mp4", ".mov"),
    ],
)
def test_a_known_content_type_wins(content_type: str, url: str, expected: str) -> None:
    """A specific Content-Type decides the extension, whatever the URL says."""
    assert extension(content_type, url) == expected


@pytest.mark.parametrize(
    ("content_type", "url", "expected"),
    [
        ("application/octet-stream", "https://cdn.example.com/a/v.MP4", ".mp4"),
        (None, "https://cdn.example.com/a/i.webp?x-oss-process=image.png", ".webp"),
        ("", "https://cdn.example.com/a.b/c.tar.gz", ".gz"),
        ("binary/octet-stream", "https://cdn.example.com/v.mp4#t=1.png", ".mp4"),
    ],
)
def test_the_url_suffix_is_next(content_type: str | None, url: str, expected: str) -> None:
    """Without a known Content-Type, the URL path's suffix (lower-cased) is used."""
    assert extension(content_type, url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example.com/download",
        "https://cdn.example.com/v1.2/file",
        "https://cdn.example.com/dir.mp4/",
        "https://cdn.example.com/file.toolong",
        "https://cdn.example.com/file.m%70",
        "https://cdn.example.com/?name=v.mp4",
    ],
)
def test_bin_is_last(url: str) -> None:
    """With neither a known type nor a plain short suffix, the extension is .bin."""
    assert extension("application/octet-stream", url) == ".bin"
