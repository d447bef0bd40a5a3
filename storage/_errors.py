"""The storage package's exceptions.

StorageError
├── RefusedURL        the URL may not be downloaded (policy, SSRF guard)
├── FetchError        the download did not complete; `retry` says whether to try again
│   ├── TooLarge      the body is over the size limit
│   └── NotMedia      the body is not the kind of media it should be (a web page, an error)
└── SinkError         the bytes could not be put in place (disk, bucket)
"""

from __future__ import annotations

__all__ = ["FetchError", "NotMedia", "RefusedURL", "SinkError", "StorageError", "TooLarge"]


class StorageError(Exception):
    """Root of the storage package's errors; `retry` tells whether trying later may help."""

    retry = False

    def __init__(self, url: str, reason: str, *, retry: bool | None = None) -> None:
        super().__init__(reason)
        self.url = url
        self.reason = reason
        if retry is not None:
            self.retry = retry


class RefusedURL(StorageError):
    """The URL is not one the service may download (scheme, credentials, host, address)."""


class FetchError(StorageError):
    """The download did not complete."""

    def __init__(
        self,
        url: str,
        reason: str,
        *,
        retry: bool | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(url, reason, retry=retry)
        self.status = status
        self.retry_after = retry_after


class TooLarge(FetchError):
    """The body is larger than the limit."""


class NotMedia(FetchError):
    """The body is not the media it should be: its Content-Type or its first bytes say so.

    Worth trying again (a CDN may serve an error page for a while), and never stored.
    """

    retry = True


class SinkError(StorageError):
    """The bytes could not be written or committed where they belong.

    `unavailable` means the sink as a whole cannot take files now (credentials refused,
    bucket missing, server unreachable): nothing is wrong with this asset in particular.
    """

    retry = True

    def __init__(
        self, url: str, reason: str, *, retry: bool | None = None, unavailable: bool = False
    ) -> None:
        super().__init__(url, reason, retry=retry)
        self.unavailable = unavailable
