"""`open_sink(STORAGE_URL)`: the place downloaded files go."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from storage._errors import SinkError
from storage.local import LocalSink

__all__ = ["open_sink"]


def open_sink(storage_url: str) -> LocalSink:
    """A local directory from a path or a `file://` URL."""
    parts = urlsplit(storage_url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise SinkError(storage_url, "file:// URLs must name a local path (file:///srv/assets)")
        return LocalSink(Path(unquote(parts.path)))
    if parts.scheme and len(parts.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise SinkError(storage_url, f"STORAGE_URL scheme {parts.scheme}:// is not supported")
    return LocalSink(Path(storage_url))
