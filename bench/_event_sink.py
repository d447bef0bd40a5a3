"""The ingest benchmark's event endpoint: `python -m bench._event_sink --port N --secret S`.

A small HTTP/1.1 server on asyncio's streams-free Protocol API, with no framework: it
shares the machine's cores with the service it measures, so it must answer quickly and
spend little CPU. Every POST, whatever its path, has its Standard Webhooks signature
checked against `--secret` (the EVENT_WEBHOOK_SECRET the service signs with), is counted
and answered 204 with no body; keep-alive is kept, as the dispatcher's client expects.
`GET /stats` answers what it counted, as JSON:

    {"received": N, "distinct": N, "bad_signature": N, "bytes": N, "types": {TYPE: N}}

`received` counts every POST, `distinct` the webhook-ids among them (an event sent twice,
after a lost answer or an expired lease, counts once), `bytes` the bodies' bytes, and
`types` the events' `type`, read from the start of the body, which the service writes
as `{"type":"...",`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter

from receiver.webhooks import SignatureError, WebhookKey

__all__ = ["Sink", "main"]

_NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_MAX_HEAD = 16 * 1024
_TYPE_PREFIX = b'{"type":"'


class Sink:
    """What the endpoint received, and the key its signatures are checked with."""

    def __init__(self, secret: str) -> None:
        self.key = WebhookKey(secret)
        self.received = 0
        self.bad_signature = 0
        self.bytes = 0
        self.ids: set[str] = set()
        self.types: Counter[str] = Counter()

    def take(self, headers: dict[str, str], body: bytes) -> None:
        self.received += 1
        self.bytes += len(body)
        try:
            self.key.verify(headers, body)
        except SignatureError:
            self.bad_signature += 1
            return
        self.ids.add(headers["webhook-id"])
        if body.startswith(_TYPE_PREFIX):
            end = body.find(b'"', len(_TYPE_PREFIX))
            self.types[body[len(_TYPE_PREFIX) : end].decode("ascii", "replace")] += 1

    def stats(self) -> bytes:
        return json.dumps(
            {
                "received": self.received,
                "distinct": len(self.ids),
                "bad_signature": self.bad_signature,
                "bytes": self.bytes,
                "types": dict(self.types),
            }
        ).encode()


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed from a buffer, answered in order."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self._one():
            pass

    def _one(self) -> bool:
        """Answer the first request in the buffer if it has all arrived; whether it had."""
        assert self.transport is not None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_HEAD:
                self._refuse()
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length", "0")
        if "transfer-encoding" in headers or not length.isdigit():
            self._refuse()
            return False
        total = end + 4 + int(length)
        if len(self.buffer) < total:
            return False
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        if method == "POST":
            self.sink.take(headers, body)
            self.transport.write(_NO_CONTENT)
        elif method == "GET" and path == "/stats":
            stats = self.sink.stats()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(stats), stats)
            )
        else:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True

    def _refuse(self) -> None:
        assert self.transport is not None
        self.buffer.clear()
        self.transport.write(_BAD)
        self.transport.close()


async def serve(host: str, port: int, sink: Sink) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(sink), host, port, backlog=512)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._event_sink")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True, help="the whsec_... the service signs with")
    options = parser.parse_args(argv)
    try:
        asyncio.run(serve(options.host, options.port, Sink(options.secret)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
