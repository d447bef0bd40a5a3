"""The ledger commands of `kling-receiver`: submit, track, sweep, status, tasks, retry, and
`events replay`.

Each opens the same ledger (and Kling client) the service uses and calls the
same code the API does; nothing here decides anything of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from receiver._clock import age_seconds
from receiver._progress import Progress
from receiver.database import open_ledger
from receiver.documents import task_json
from receiver.events import EVENT_TYPES, replay_request
from receiver.kling import KlingClient, KlingError, client_for
from receiver.ledger import Ledger
from receiver.models import AssetState, PayloadError, Source, TaskRecord, TaskStatus
from receiver.poller import poll_after, update_from_reply
from receiver.settings import ConfigError, Settings
from receiver.submit import SubmitError, submit
from receiver.sweep import Tally, now_ms, sweep

__all__ = ["add_event_commands", "add_task_commands"]


def add_task_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = commands.add_parser("submit", help="submit a Kling task with its own callback URL")
    send.add_argument(
        "action", help="videos/text2video (old standard) or text-to-video/kling-2.6 (current)"
    )
    send.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a create-request field (a text value; repeat it; use --json for other types)",
    )
    send.add_argument("--json", type=Path, metavar="FILE", help="the create-request fields as JSON")
    send.add_argument("--idempotency-key", help="submitting again with this key is safe")
    send.set_defaults(handler=_submit)

    adopt = commands.add_parser("track", help="adopt a task submitted elsewhere, to be polled")
    adopt.add_argument("action")
    adopt.add_argument("task_id")
    adopt.set_defaults(handler=_track)

    backfill = commands.add_parser(
        "sweep", help="adopt the account's succeeded tasks that the ledger does not know"
    )
    backfill.add_argument(
        "--since",
        type=_age,
        default="30d",
        metavar="AGE",
        help="list tasks created this long ago or later: 30d, 12h, 90m (default 30d)",
    )
    backfill.set_defaults(handler=_sweep)

    show = commands.add_parser("status", help="show one task")
    show.add_argument("task_id")
    show.add_argument("--json", action="store_true", help="print the API's JSON")
    show.set_defaults(handler=_status)

    listing = commands.add_parser("tasks", help="list tasks, newest first")
    listing.add_argument("--status", choices=[s.value for s in TaskStatus])
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="print the API's JSON")
    listing.set_defaults(handler=_tasks)

    again = commands.add_parser("retry", help="download the failed assets of tasks again")
    again.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    again.add_argument(
        "--failed", action="store_true", help="every task with a failed asset, found in the ledger"
    )
    again.add_argument(
        "--force", action="store_true", help="also fetch stored assets again and compare hashes"
    )
    again.set_defaults(handler=_retry)


def add_event_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    events = commands.add_parser("events", help="outbound events")
    actions = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    again = actions.add_parser(
        "replay", help="send past events again (new attempts, the same webhook-id)"
    )
    again.add_argument(
        "--since",
        required=True,
        metavar="TIME",
        help="events written since this time (2026-12-01T00:00:00Z) or age (30d, 12h, 90m)",
    )
    again.add_argument(
        "--type", action="append", default=[], choices=EVENT_TYPES, help="only this type (repeat)"
    )
    again.add_argument("--endpoint", help="only to this one of EVENT_WEBHOOK_URLS")
    again.set_defaults(handler=_replay)


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    asked = replay_request(
        args.since, args.type, args.endpoint, settings.event_endpoints, time.time()
    )

    async def work(ledger: Ledger) -> int:
        bar = Progress()

        def progress(done: int, total: int) -> None:
            bar.show(done, total, "of the outbox replayed")

        queued = await ledger.replay(asked.since, asked.types, asked.endpoint, progress)
        bar.close()
        print(f"queued {queued} event deliveries written since {asked.since}")
        return 0

    return _run(settings, work)


def _run(settings: Settings, work: Callable[[Ledger], Awaitable[int]]) -> int:
    async def main() -> int:
        async with open_ledger(settings.database_url) as ledger:
            return await work(ledger)

    return asyncio.run(main())


def _run_with_kling(
    settings: Settings, work: Callable[[Ledger, KlingClient], Awaitable[int]]
) -> int:
    if not settings.kling_configured:
        raise ConfigError("set KLING_API_KEY, or KLING_ACCESS_KEY and KLING_SECRET_KEY")

    async def with_client(ledger: Ledger) -> int:
        async with client_for(settings) as client:
            return await work(ledger, client)

    return _run(settings, with_client)


def _submit(settings: Settings, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.json:
        try:
            loaded = json.loads(args.json.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {args.json}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.json} must hold a JSON object")
        params |= loaded
    for pair in args.param:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param takes KEY=VALUE, got {pair!r}")
        params[key] = value

    async def work(ledger: Ledger, client: KlingClient) -> int:
        try:
            task, _ = await submit(
                ledger, client, settings, args.action, params, args.idempotency_key
            )
        except SubmitError as exc:
            print(f"kling-receiver: {exc.message}", file=sys.stderr)
            return 1
        print(json.dumps(task_json(task), indent=2))
        return 0

    return _run_with_kling(settings, work)


def _track(settings: Settings, args: argparse.Namespace) -> int:
    async def work(ledger: Ledger, client: KlingClient) -> int:
        new = await ledger.track(args.action, args.task_id)
        try:
            reply = await client.query(args.action, args.task_id)
            await ledger.apply(
                update_from_reply(
                    reply.data,
                    Source.track,
                    args.action,
                    archive_watermarked=settings.archive_watermarked,
                    poll_after=poll_after(settings, args.action),
                )
            )
        except (KlingError, PayloadError, ValueError) as exc:
            print(f"kling-receiver: tracked, but the first query failed: {exc}", file=sys.stderr)
        task = await ledger.task(args.task_id)
        assert task is not None
        print(("now tracking " if new else "already known; polling again: ") + _summary(task))
        return 0

    return _run_with_kling(settings, work)


def _age(text: str) -> int:
    """Milliseconds in an age such as 30d, 12h or 90m."""
    seconds = age_seconds(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"an age is a whole number and d, h or m: {text!r}")
    return seconds * 1000


def _sweep(settings: Settings, args: argparse.Namespace) -> int:
    bar = Progress(lines=True)  # a line per page where there is no terminal, as a log wants

    def progress(tally: Tally) -> None:
        line = f"tasks swept: {tally.adopted} adopted, {tally.known} known"
        bar.show(tally.seen, tally.total, line, force=True)

    async def work(ledger: Ledger, client: KlingClient) -> int:
        end = now_ms()
        try:
            tally = await sweep(ledger, client, settings, end - args.since, end, progress=progress)
        except KlingError as exc:
            bar.close()
            print(f"kling-receiver: the sweep stopped: {exc}", file=sys.stderr)
            return 1
        bar.close()
        print(
            f"{tally.seen} tasks seen, {tally.adopted} adopted, {tally.known} already known"
            + (f", {tally.unreadable} unreadable" if tally.unreadable else "")
        )
        return 0

    return _run_with_kling(settings, work)


def _status(settings: Settings, args: argparse.Namespace) -> int:
    async def work(ledger: Ledger) -> int:
        task = await ledger.task(args.task_id)
        if task is None:
            print(f"kling-receiver: no task {args.task_id!r} is recorded", file=sys.stderr)
            return 1
        print(json.dumps(task_json(task), indent=2) if args.json else _details(task))
        return 0

    return _run(settings, work)


def _tasks(settings: Settings, args: argparse.Namespace) -> int:
    async def work(ledger: Ledger) -> int:
        status = TaskStatus(args.status) if args.status else None
        page = await ledger.tasks(status=status, limit=max(1, min(args.limit, 200)))
        if args.json:
            tasks = [task_json(task) for task in page.tasks]
            print(json.dumps({"tasks": tasks, "next_cursor": page.next_cursor}, indent=2))
        else:
            for task in page.tasks:
                print(_summary(task))
        return 0

    return _run(settings, work)


def _retry(settings: Settings, args: argparse.Namespace) -> int:
    """Queue the failed assets of tasks again (with --force, their stored ones too)."""
    if bool(args.task_ids) == args.failed:
        raise ConfigError("name the tasks to retry, or give --failed for every failed one")

    async def work(ledger: Ledger) -> int:
        task_ids = list(dict.fromkeys(args.task_ids)) or await _failed_tasks(ledger)
        progress = Progress()
        queued, unknown = 0, []
        for done, task_id in enumerate(task_ids, start=1):
            found = await ledger.requeue(task_id, force=args.force)
            if found is None:
                unknown.append(task_id)
            queued += found or 0
            progress.show(done, len(task_ids), f"tasks, {queued} asset(s) queued")
        progress.close()
        for task_id in unknown:
            print(f"kling-receiver: no task {task_id!r} is recorded", file=sys.stderr)
        retried = len(task_ids) - len(unknown)
        print(f"queued {queued} asset(s) of {retried} task(s) for download")
        return 1 if unknown else 0

    return _run(settings, work)


async def _failed_tasks(ledger: Ledger) -> list[str]:
    """The tasks with an asset that failed for good, each once."""
    found: dict[str, None] = {}
    cursor = None
    while True:
        page = await ledger.asset_problems(state=AssetState.failed, limit=200, cursor=cursor)
        found.update(dict.fromkeys(problem.task_id for problem in page.problems))
        if page.next_cursor is None:
            return list(found)
        cursor = page.next_cursor


def _summary(task: TaskRecord) -> str:
    stored = sum(asset.state == "stored" for asset in task.assets)
    state = "archived" if task.archived else f"{stored}/{len(task.assets)} stored"
    learned = f", learned by {task.terminal_source}" if task.terminal_source else ""
    return f"{task.task_id}  {task.action or '-'}  {task.status or 'unknown'}{learned}  ({state})"


def _details(task: TaskRecord) -> str:
    lines = [_summary(task)]
    if task.status_msg:
        lines.append(f"  message: {task.status_msg}")
    if task.flag:
        lines.append(f"  flagged: {task.flag}")
    lines.append(f"  updates: {task.updates}, polls: {task.polls}, last: {task.updated_at}")
    for asset in task.assets:
        where = asset.location or asset.url
        note = f"  ({asset.error})" if asset.error else ""
        name = f"{asset.kind} {asset.index}" + (f" {asset.variant}" if asset.variant else "")
        lines.append(f"  {name}: {asset.state}  {where}{note}")
    return "\n".join(lines)
