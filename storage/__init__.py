"""storage: bytes from a URL into a place (a local directory, or an S3-compatible bucket).

This package never imports `receiver`.
"""

from __future__ import annotations

from storage._errors import (
    FetchError,
    NotMedia,
    RefusedURL,
    SinkError,
    StorageError,
    TooLarge,
)
from storage.fetch import MAX_RETRY_AFTER, Fetched, Limits, Writer, fetch
from storage.guard import UrlPolicy, is_public_address
from storage.local import LocalSink, LocalWriter
from storage.naming import extension
from storage.s3 import S3Options, S3Sink
from storage.sinks import Sink, SinkWriter, open_sink

__all__ = [
    "MAX_RETRY_AFTER",
    "FetchError",
    "Fetched",
    "Limits",
    "LocalSink",
    "LocalWriter",
    "NotMedia",
    "RefusedURL",
    "S3Options",
    "S3Sink",
    "Sink",
    "SinkError",
    "SinkWriter",
    "StorageError",
    "TooLarge",
    "UrlPolicy",
    "Writer",
    "extension",
    "fetch",
    "is_public_address",
    "open_sink",
]
