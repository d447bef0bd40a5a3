"""`open_sink(STORAGE_URL)`: the place downloaded files go."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from storage._errors import SinkError
from storage.fetch import Writer
from storage.local import LocalSink
from storage.s3 import S3Options, S3Sink

__all__ = ["Sink", "SinkWriter", "open_sink"]


class SinkWriter(Writer, Protocol):
    """A download on its way into a sink: written by `fetch`, then committed or dropped."""

    def commit(self, key: str, sidecar: dict[str, Any]) -> str:
        """Make the bytes visible as `key`, with the JSON sidecar beside them; their location."""
        ...

    def close(self) -> None:
        """Stop, keeping what a later attempt may resume from."""
        ...

    def discard(self) -> None:
        """Stop and drop everything written."""
        ...


class Sink(Protocol):
    """A place for files: a local directory, or an S3-compatible bucket."""

    def open(self, stem: str) -> SinkWriter:
        """A writer for the key `stem` + extension."""
        ...

    def check(self) -> str | None:
        """None when the sink can take files now; otherwise a sentence that says what to fix."""
        ...

    def presign(self, location: str, seconds: int) -> str | None:
        """A URL that opens the file at `location` for `seconds`, if the sink can make one."""
        ...


def open_sink(storage_url: str, s3: S3Options | None = None) -> Sink:
    """A local directory from a path or a `file://` URL; a bucket from `s3://bucket/prefix`."""
    parts = urlsplit(storage_url)
    if parts.scheme == "s3":
        if s3 is None:
            raise SinkError(storage_url, "an s3:// STORAGE_URL needs AWS credentials")
        if not parts.netloc:
            raise SinkError(storage_url, "STORAGE_URL must name a bucket: s3://bucket/prefix")
        return S3Sink(parts.netloc, unquote(parts.path), s3)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise SinkError(storage_url, "file:// URLs must name a local path (file:///srv/assets)")
        return LocalSink(Path(unquote(parts.path)))
    if parts.scheme and len(parts.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise SinkError(storage_url, f"STORAGE_URL scheme {parts.scheme}:// is not supported")
    return LocalSink(Path(storage_url))
