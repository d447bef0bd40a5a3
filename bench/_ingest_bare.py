"""The ingest benchmark's baseline: `python -m bench._ingest_bare --port N`.

A bare Starlette app with one POST route under the callback prefix that reads
the body, parses it as JSON and answers 200 with a small JSON object; nothing
is checked, recorded or logged. It is served by uvicorn with the options
`kling-receiver serve` uses (one process, the same loop and HTTP
implementation, no access log, no server header), so the two differ only in
what the app does.
"""

from __future__ import annotations

import argparse
import json
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["app", "main"]


async def receive(request: Request) -> Response:
    data = json.loads(await request.body())
    return JSONResponse({"ok": True, "task_id": data.get("task_id"), "bare": True})


app = Starlette(routes=[Route("/callbacks/kling/{rest:path}", receive, methods=["POST"])])


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from receiver.cli import server_config
    from receiver.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m bench._ingest_bare")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args(argv)
    server = uvicorn.Server(
        server_config(app, Settings(host=options.host, port=options.port))
    )  # as `serve` runs
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
