"""The HTTP protocol under `serve`: uvicorn's h11 protocol with read deadlines and a connection cap.

uvicorn bounds neither how long a request's headers and body may take to
arrive nor how many connections may stay open (its `limit_concurrency` answers
503 to everyone once reached, genuine senders included). Anyone who can reach
the port could then hold connections, and the file descriptors under them,
for ever. Here every connection that is still sending a request (or idling
between requests) has a deadline, and when the cap is reached a new
connection pushes out the one that has been sending the longest: a genuine
sender finishes its request in milliseconds, so it is never the oldest.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionGuard", "guarded_protocol", "open_file_budget"]

log = logging.getLogger("receiver.server")

# File descriptors kept back from connections for everything else the process opens:
# the database, files being downloaded, sockets to CDNs, Kling and the bucket.
_RESERVED_FILES = 256
_LOG_EVERY = 60.0


def open_file_budget() -> int:
    """How many connections the open-file limit leaves room for, after raising it to the hard one.

    Raising the soft limit is what Go's runtime does at start: the hard limit is the
    real ceiling the administrator chose, the soft one an old default.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(32, soft - _RESERVED_FILES)


@dataclass
class ConnectionGuard:
    """Deadlines for reading requests, and the cap on open connections, shared by all of them."""

    header_timeout: float
    body_timeout: float
    max_connections: int
    # Connections still sending a request or idle between two, the longest waiting first.
    _sending: dict[GuardedH11Protocol, None] = field(default_factory=dict)
    _open: set[GuardedH11Protocol] = field(default_factory=set)
    _dropped: dict[str, int] = field(default_factory=lambda: {"timed_out": 0, "pushed_out": 0})
    _logged_at: float = 0.0

    @property
    def backlog(self) -> int:
        """The listen backlog, small beside the cap.

        asyncio accepts up to `backlog` connections in one go before any of them is
        counted here, so a large one could overrun the open-file limit between two counts.
        """
        return max(16, min(2048, self.max_connections // 16))

    def opened(self, connection: GuardedH11Protocol) -> None:
        self._open.add(connection)
        if len(self._open) <= self.max_connections:
            return
        # The newcomer joined the line last, so it goes only when all the others are busy
        # with whole requests.
        victim = next(iter(self._sending), connection)
        self.drop(victim, "pushed_out")

    def closed(self, connection: GuardedH11Protocol) -> None:
        self._open.discard(connection)
        self._sending.pop(connection, None)

    def sending(self, connection: GuardedH11Protocol) -> None:
        self._sending.setdefault(connection, None)

    def settled(self, connection: GuardedH11Protocol) -> None:
        self._sending.pop(connection, None)

    def drop(self, connection: GuardedH11Protocol, why: str) -> None:
        """Close a connection that took too long, or that a newer one pushed out."""
        self.closed(connection)
        connection.transport.abort()  # nothing to flush: it sent no whole request
        self._dropped[why] += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            # One line a minute at most, however many slow peers there are.
            log.warning(
                "dropped slow connections",
                extra=self._dropped | {"open": len(self._open), "limit": self.max_connections},
            )
            self._logged_at = now
            self._dropped = dict.fromkeys(self._dropped, 0)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, told by its guard how long each phase of a request may take."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()
        self.guard.opened(self)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_deadline(None)
        self.guard.closed(self)
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Follow the request's phase from h11's view of the peer, and time the slow ones."""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase == self._phase:
            return
        self._phase = phase
        if phase is None:  # a whole request is in: the app answers it in its own time
            self.guard.settled(self)
            self._set_deadline(None)
            return
        self.guard.sending(self)
        timeout = self.guard.header_timeout if phase == "headers" else self.guard.body_timeout
        self._set_deadline(self.loop.call_later(timeout, self.guard.drop, self, "timed_out"))

    def _set_deadline(self, deadline: asyncio.TimerHandle | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = deadline


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http` setting, bound to this guard."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
