"""Storage keys: their parts, and file extensions from the Content-Type or else the URL."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from storage._errors import SinkError

__all__ = ["extension", "key_parts"]

_BY_TYPE = {
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/webm": ".webm",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "audio/mpeg": ".mp3",
    "audio/mp4": ".m4a",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
}
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,254}")
_SUFFIX = re.compile(r"\.([A-Za-z0-9]{1,5})$")


def extension(content_type: str | None, url: str) -> str:
    """`.mp4`, `.png`…: the Content-Type's when it is specific, else the URL's, else `.bin`."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type in _BY_TYPE:
        return _BY_TYPE[media_type]
    match = _SUFFIX.search(urlsplit(url).path)
    return f".{match.group(1).lower()}" if match else ".bin"


def key_parts(key: str) -> list[str]:
    """The `/`-separated parts of a storage key; refuses any that a path or URL could misread."""
    parts = key.split("/")
    if not all(_PART.fullmatch(part) and set(part) != {"."} for part in parts):
        raise SinkError(key, f"unsafe storage key {key!r}", retry=False)
    return parts
