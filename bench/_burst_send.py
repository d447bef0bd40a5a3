"""The burst's sender: HTTP/1.1 POSTs over N keep-alive connections, on bare asyncio streams.

httpx.AsyncClient was the first choice, but on the 2-CPU benchmark VM it sent
only ~150 requests/s through a 64-connection pool (~400/s through 1-16; the
service's /healthz answers ~7000/s to wrk over 64 connections): the sender,
not the service, would have been measured. Here each connection is one
coroutine writing a prepared request and reading the answer (status line,
headers, a Content-Length body), which keeps the sender's share of the CPU small.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Answer", "Sent", "post_all"]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class Sent:
    """Every delivery's answer and latency, in order, and when the first went out."""

    wall_started: float  # time.time() as the first request went out
    seconds: float  # until the last answer was read
    answers: list[Answer | None]  # None: the connection failed (see `errors`)
    latencies: list[float]
    errors: list[str]


class _Closed(Exception):
    pass


async def _read_answer(reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    """One response, and whether the server keeps the connection open."""
    status_line = await reader.readline()
    if not status_line:
        raise _Closed("the server closed the connection")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise _Closed(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    length: int | None = None
    keep = parts[0] == b"HTTP/1.1"
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection":
            token = value.strip().lower()
            keep = token != b"close" if keep else token == b"keep-alive"
        elif name == b"transfer-encoding":
            raise _Closed("chunked answers are not read by this sender")
    if length is None:
        raise _Closed("an answer without Content-Length")
    body = await reader.readexactly(length)
    return Answer(int(parts[1]), body), keep


async def _post_all(
    requests: Sequence[tuple[str, bytes]], host: str, port: int, connections: int, window: float
) -> Sent:
    count = len(requests)
    answers: list[Answer | None] = [None] * count
    latencies = [0.0] * count
    errors: list[str] = []
    numbers = iter(range(count))  # shared by the connections: each takes the next request
    authority = f"{host}:{port}"

    def prepared(path: str, body: bytes) -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("ascii") + body

    wire = [prepared(path, body) for path, body in requests]

    async def connection() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            for number in numbers:
                if window:
                    wait = started + number * window / count - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                sent = time.perf_counter()
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    assert reader is not None
                    writer.write(wire[number])
                    answer, keep = await _read_answer(reader)
                except (OSError, asyncio.IncompleteReadError, _Closed, ValueError) as exc:
                    errors.append(f"request {number}: {exc!r}")
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    continue
                latencies[number] = time.perf_counter() - sent
                answers[number] = answer
                if not keep:
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    wall_started = time.time()
    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(min(connections, count))))
    return Sent(wall_started, time.perf_counter() - started, answers, latencies, errors)


def post_all(
    base_url: str, requests: Sequence[tuple[str, bytes]], connections: int, window: float = 0.0
) -> Sent:
    """POST each (path, JSON body) to `base_url`, `connections` at a time.

    With `window` seconds, request n is not sent before n * window / len(requests)
    seconds after the first; with 0 each goes as soon as a connection is free.
    """
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"need http://host:port, got {base_url}")
    return asyncio.run(_post_all(requests, parts.hostname, parts.port, connections, window))
