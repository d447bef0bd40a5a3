"""The `kling-receiver` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from receiver import tokens
from receiver._commands import add_event_commands, add_task_commands
from receiver._files import keep_private
from receiver._logging import configure_logging, wants_text
from receiver._redact import redact_url
from receiver.settings import ConfigError, Settings, load_settings
from receiver.trigger import DEFAULT_ACTIONS, KINDS, STATUSES

if TYPE_CHECKING:
    import uvicorn

__all__ = ["main"]

log = logging.getLogger("receiver.cli")


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """How `serve` runs an ASGI app (the ingest benchmark serves its baseline the same way).

    Logging stays ours (JSON lines); the access log is off because callback paths
    carry their token. Requests are read under the deadlines and connection cap of
    `receiver._server`.
    """
    import uvicorn

    from receiver._server import ConnectionGuard, guarded_protocol, open_file_budget

    guard = ConnectionGuard(
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        max_connections=settings.max_connections or open_file_budget(),
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(guard),
        backlog=guard.backlog,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        server_header=False,
    )


def serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the web app and its in-process download workers until SIGTERM or SIGINT."""
    import uvicorn

    from receiver.app import create_app

    configure_logging(settings.log_level, settings.log_format)
    if settings.generated_secrets:
        extra = {
            "names": [name.upper() for name in settings.generated_secrets],
            "file": str(settings.secrets_path.resolve()),
        }
        log.info("using generated secrets", extra=extra)
        if not settings.database_url.startswith("sqlite:"):
            # A shared database means processes on other machines, with secrets of their own.
            log.warning(
                "secrets generated on a shared database: set them on every process, or "
                "callback URLs made by one are refused by another",
                extra=extra,
            )
    app = create_app(settings)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and wants_text(settings.log_format, sys.stderr):
                print(banner(settings), file=sys.stderr, flush=True)

        async def shutdown(self, sockets: Any = None) -> None:
            app.state.stopping.set()  # open event streams end, not hold the exit
            await super().shutdown(sockets)

    server = Server(server_config(app, settings))
    # After draining, uvicorn restores the previous handlers and raises the stop signal
    # again; without these, SIGTERM would end a clean shutdown with "killed by SIGTERM".
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _stopped)
    server.run()
    return 0 if server.started else 1


def banner(settings: Settings) -> str:
    """What a person starting `serve` in a terminal wants to know first."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    base = settings.public_url
    generated = ", ".join(name.upper() for name in settings.generated_secrets)
    secrets = (
        f"{settings.secrets_path.resolve()} (generated here: {generated})"
        if generated
        else "from the environment"
    )
    rows = [
        ("dashboard", f"{base}/  (sign in with ADMIN_TOKEN)"),
        (
            "callbacks",
            f"POST {base}{tokens.CALLBACK_PREFIX}/…  (`kling-receiver callback-url` "
            "prints one to give Kling)",
        ),
        ("API", f"{base}/api/tasks  (Authorization: Bearer <ADMIN_TOKEN>)"),
        ("events", f"{len(settings.event_endpoints)} endpoint(s); live: {base}/api/events/stream"),
        ("secrets", secrets),
        ("storage", redact_url(settings.storage_url)),
        ("ledger", redact_url(settings.database_url)),
    ]
    lines = [f"kling-receiver is listening on http://{host}:{settings.port}"]
    lines += [f"  {name:<10} {value}" for name, value in rows]
    lines.append("  Ctrl-C stops it; files being downloaded resume at the next start.")
    return "\n".join(lines)


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def worker(settings: Settings, args: argparse.Namespace) -> int:
    """Run download workers alone against the shared database until SIGTERM or SIGINT."""
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(_work(settings, args.concurrency))


async def _work(settings: Settings, concurrency: int | None) -> int:
    from receiver.database import open_ledger
    from receiver.dispatch import dispatcher_for
    from receiver.ledger import LedgerUnavailable
    from receiver.metrics import Metrics
    from receiver.workers import downloader_for

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(stop_signal, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        try:
            ledger = await stack.enter_async_context(open_ledger(settings.database_url))
        except LedgerUnavailable as exc:
            # As `serve` ends when its start fails: a line that says why, and exit status 3.
            log.critical("cannot open the ledger", extra={"error": str(exc)})
            return 3
        # DOWNLOAD_CONCURRENCY=0 turns off serve's own pool; a worker always works.
        downloader = downloader_for(
            settings, ledger, concurrency or settings.download_concurrency or 4
        )
        log.info("workers started", extra={"concurrency": downloader.concurrency})
        running = [asyncio.create_task(downloader.run())]
        if settings.event_dispatch_concurrency:
            # Workers send events too: more senders drain a backlog sooner.
            running.append(asyncio.create_task(dispatcher_for(settings, ledger, Metrics()).run()))
        await stop.wait()
        for task in running:
            task.cancel()  # hands unfinished jobs back; their bytes stay for a resume
        await asyncio.gather(*running, return_exceptions=True)
    log.info("workers stopped")
    return 0


def callback_url(settings: Settings, args: argparse.Namespace) -> int:
    """Print a callback URL to paste into a task submitted by hand."""
    if args.external_task_id:
        ref = tokens.task_ref(args.external_task_id)
    else:
        ref = tokens.new_channel_ref()
    path = tokens.callback_path(settings.secret("callback_secret"), ref, args.action)
    print(settings.public_url + path)
    return 0


def send_sample(settings: Settings, args: argparse.Namespace) -> int:
    """Send a sample callback to the running service and follow its task."""
    from receiver.trigger import Request, TriggerError, trigger

    kinds = [kind.strip() for kind in args.with_kinds.split(",") if kind.strip()]
    if unknown := sorted(set(kinds) - set(KINDS)):
        raise ConfigError(f"--with takes {', '.join(KINDS)}, not {', '.join(unknown)}")
    request = Request(
        status=args.status,
        body_format=args.format,
        action=args.action or DEFAULT_ACTIONS[args.format],
        kinds=kinds,
        urls=args.url,
        task_id=args.task_id,
        to=args.to,
        wait=args.wait,
    )
    try:
        return asyncio.run(trigger(settings, request))
    except TriggerError as exc:
        print(f"kling-receiver: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kling-receiver",
        description="Receive Kling task callbacks and archive every generated file.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("serve", help="run the web service on HOST:PORT")
    run.set_defaults(handler=serve)

    work = commands.add_parser("worker", help="run download workers alone (several may run)")
    work.add_argument(
        "--concurrency", type=int, help="downloads at once (default DOWNLOAD_CONCURRENCY)"
    )
    work.set_defaults(handler=worker)

    add_task_commands(commands)

    sample = commands.add_parser(
        "trigger", help="send a realistic sample callback to the running service"
    )
    sample.add_argument("status", choices=STATUSES, help="the status the callback reports")
    sample.add_argument("--action", help="the task's action (default: a text-to-video one)")
    sample.add_argument(
        "--with",
        dest="with_kinds",
        default="video",
        metavar="KINDS",
        help="files of a succeeded task, from the built-in samples: video,image,audio",
    )
    sample.add_argument(
        "--format", choices=("old", "new"), default="old", help="the callback body standard"
    )
    sample.add_argument(
        "--url", action="append", default=[], help="a file URL to report instead (repeat)"
    )
    sample.add_argument("--task-id", help="continue this task (default: a new one)")
    sample.add_argument("--to", help="the service's base URL (default PUBLIC_URL)")
    sample.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to follow a succeeded task until its files are stored (0: not at all)",
    )
    sample.set_defaults(handler=send_sample)
    add_event_commands(commands)

    url = commands.add_parser(
        "callback-url", help="print a callback URL for a task submitted by hand"
    )
    url.add_argument(
        "--action",
        help="the task's action (videos/text2video, text-to-video/kling-2.6), so it can be queried",
    )
    url.add_argument(
        "--external-task-id",
        help="bind the URL to the one task submitted with this external_task_id",
    )
    url.set_defaults(handler=callback_url)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        keep_private(settings)  # before any command opens or creates a file
        return int(args.handler(settings, args))
    except (ConfigError, ValueError) as exc:
        print(f"kling-receiver: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
