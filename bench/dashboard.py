"""Dashboard pages over a large SQLite ledger: the p99 latency of each page.

The ledger is made as the service makes one: 200 template tasks recorded through
`Ledger.apply` and `settle_asset` (succeeded with two files and archived, failed, still
processing, and succeeded with a file that failed), each with its outbox events; then
copied in SQL, with new task ids and times, until it holds `--dashboard-tasks` tasks
(100,000 by default) with their assets, deliveries and events. The service runs as a
real process (`serve`, downloads off) on that ledger, and each page is requested
`--dashboard-requests` times, one after another over one connection, with a session
cookie, after ten warm-up requests. The baseline is `GET /healthz` measured the same
way: what a request costs with no page to build.

The goal (the dashboard issue's): the task list and a task page answer within 100 ms
at the 99th percentile on SQLite. The other pages are reported beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._core import BenchError, Goal, Report, Role, Row, paired_ratio, shuffled_rounds

__all__ = ["add_arguments", "run"]

_TEMPLATES = 200
_GOAL_MS = 100.0
_WARMUP = 10
_ADMIN_TOKEN = "bench-dashboard-admin-token"
_CALLBACK_SECRET = "bench-dashboard-callback-secret"
_ROOT = Path(__file__).resolve().parent.parent


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--dashboard-tasks", type=int, default=100_000, help="tasks in the ledger (100000)"
    )
    group.add_argument(
        "--dashboard-requests", type=int, default=300, help="requests per page and round (300)"
    )


def run(options: argparse.Namespace) -> Report:
    rounds = options.rounds
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-", dir=options.dir) as scratch:
        data = Path(scratch) / "data"
        started = time.monotonic()
        data.mkdir(parents=True)
        sample_id, counts = asyncio.run(_fill(data, options.dashboard_tasks))
        filled = time.monotonic() - started
        pages = {
            "GET /healthz (baseline)": "/healthz",
            "task list, first page": "/tasks",
            "task list, filtered by status": "/tasks?status=failed",
            "task list, searched by task id": f"/tasks?q={sample_id}",
            "task page": f"/tasks/{sample_id}",
            "overview": "/",
            "failures": "/failures",
            "events": "/events",
        }
        with _service(data) as (base, cookie):
            deep = _deep_cursor(base, cookie)
            pages["task list, page 200"] = f"/tasks?cursor={deep}"
            samples: dict[str, list[float]] = {name: [] for name in pages}
            for _, name in shuffled_rounds(list(pages), rounds, seed=5):
                samples[name].append(_p99(base, cookie, pages[name], options.dashboard_requests))
    baseline = samples.pop("GET /healthz (baseline)")
    rows = [Row("GET /healthz (baseline)", Role.baseline, "ms p99", tuple(baseline), 1.0)]
    judged = {"task list, first page", "task page", "task list, page 200"}
    for name, values in samples.items():
        role = Role.subject if name in judged else Role.reference
        rows.append(Row(name, role, "ms p99", tuple(values), paired_ratio(values, baseline)))
    goals = [
        Goal(
            f"{name}: p99 under {_GOAL_MS:g} ms",
            f"{statistics.median(samples[name]):.1f} ms (median of {rounds} rounds)",
            statistics.median(samples[name]) < _GOAL_MS,
        )
        for name in sorted(judged)
    ]
    return Report(
        name="dashboard",
        setup=(
            f"ledger   SQLite, {counts['tasks']:,} tasks, {counts['assets']:,} assets, "
            f"{counts['events']:,} deliveries, {counts['outbox']:,} outbox events "
            f"(made in {filled:.0f} s)",
            f"requests {options.dashboard_requests} per page and round, one at a time, "
            f"after {_WARMUP} warm-up; {rounds} rounds in shuffled order",
            "ratio    a page's p99 over /healthz's p99 in the same round (lower is better)",
        ),
        rows=tuple(rows),
        goals=tuple(goals),
        notes=(
            "A goal passes when the median over the rounds of its p99 is under the limit.",
            f"The task page and search show task {sample_id}, a succeeded task with two "
            "stored files.",
        ),
    )


async def _fill(data: Path, tasks: int) -> tuple[str, dict[str, int]]:
    """A ledger of `tasks` tasks: templates recorded by the ledger, then copied."""
    from receiver._clock import utc_now
    from receiver.database import open_ledger
    from receiver.ledger import AssetResult, Update
    from receiver.models import AssetState, CallbackRef, Source
    from receiver.shapes import parse_task

    path = data / "kling-receiver.db"
    rng = random.Random(17)

    def update(body: dict[str, object]) -> Update:
        raw = json.dumps(body).encode()
        return Update(
            parse_task(body),
            raw,
            Source.callback,
            utc_now(),
            CallbackRef("h-bench", "videos/text2video"),
        )

    async with open_ledger(f"sqlite:///{path}") as ledger:
        await ledger.set_endpoints(["https://hooks.example/kling"])
        for n in range(_TEMPLATES):
            task_id = f"{700000000000000000 + n}"
            kind = n % 4
            for status in ("submitted", "processing"):
                await ledger.apply(update({"task_id": task_id, "task_status": status}))
            if kind == 1:
                await ledger.apply(
                    update(
                        {
                            "task_id": task_id,
                            "task_status": "failed",
                            "task_status_msg": "Failure to pass the risk control system",
                        }
                    )
                )
            elif kind != 2:
                urls = [f"https://cdn.example/{task_id}/{i}.mp4" for i in range(2)]
                files = {
                    "videos": [{"id": f"{task_id}_0", "url": urls[0]}],
                    "images": [{"index": 0, "url": urls[1]}],
                }
                await ledger.apply(
                    update({"task_id": task_id, "task_status": "succeed", "task_result": files})
                )
        owner = "bench"
        while (job := await ledger.claim_asset(owner, 60)) is not None:
            failed = job.asset_id % 8 == 3
            result = (
                AssetResult(AssetState.failed, error="HTTP 403 from the CDN")
                if failed
                else AssetResult(
                    AssetState.stored,
                    location=f"/data/assets/{job.asset_id}",
                    sha256=f"{rng.getrandbits(256):064x}",
                    size=rng.randrange(1 << 20, 40 << 20),
                )
            )
            await ledger.settle_asset(job.asset_id, owner, result)
    counts = _copy(path, tasks)
    return "700000000000000000", counts


def _copy(path: Path, tasks: int) -> dict[str, int]:
    """Copy the template tasks, with their rows in every table, until there are `tasks`."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        copies = max(0, -(-tasks // _TEMPLATES) - 1)
        conn.execute("BEGIN")
        conn.execute("CREATE TEMP TABLE copies (n INTEGER PRIMARY KEY)")
        conn.executemany("INSERT INTO copies VALUES (?)", [(n,) for n in range(1, copies + 1)])
        columns = {table: _columns(conn, table) for table in ("tasks", "assets", "events")}
        # Task ids stay numeric, as Kling's are; each copy is a minute older than the last.
        renamed = {
            "task_id": "CAST(t.task_id AS INTEGER) + c.n * 1000",
            "external_task_id": "NULL",
            "idempotency_key": "NULL",
        }
        conn.execute(_insert("tasks", columns["tasks"], "t", renamed, "tasks AS t, copies AS c"))
        task_map = """JOIN tasks AS o ON o.id = x.task_pk
                      JOIN tasks AS t ON t.task_id = CAST(o.task_id AS INTEGER) + c.n * 1000"""
        for table in ("assets", "events"):
            source = f"{table} AS x, copies AS c {task_map}"
            conn.execute(_insert(table, columns[table], "x", {"task_pk": "t.id"}, source))
        conn.execute("""INSERT INTO outbox (msg_id, type, task_id, body, created_at)
                        SELECT x.msg_id || '_' || c.n, x.type,
                               CAST(x.task_id AS INTEGER) + c.n * 1000, x.body,
                               strftime('%Y-%m-%dT%H:%M:%fZ', x.created_at, -c.n || ' minutes')
                        FROM outbox AS x, copies AS c""")
        conn.execute("""INSERT INTO event_deliveries (event_pk, endpoint, task_id, state, attempts,
                                                      next_attempt_at, created_at, updated_at)
                        SELECT o.id, 'https://hooks.example/kling', o.task_id, 'delivered', 1,
                               o.created_at, o.created_at, o.created_at
                        FROM outbox AS o
                        WHERE NOT EXISTS (SELECT 1 FROM event_deliveries AS d
                                          WHERE d.event_pk = o.id)""")
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("tasks", "assets", "events", "outbox")
        }
    finally:
        conn.close()


def _columns(conn: sqlite3.Connection, table: str) -> dict[str, str]:
    """A table's columns but its id, with their declared types."""
    return {row[1]: row[2] for row in conn.execute(f"PRAGMA table_info({table})") if row[1] != "id"}


def _insert(
    table: str, columns: dict[str, str], alias: str, replaced: dict[str, str], source: str
) -> str:
    """Copy rows of `source`, each time (`*_at`) moved back by the copy's number in minutes,
    so the copies spread over hours as a ledger's rows do."""

    def value(name: str, kind: str) -> str:
        if name in replaced:
            return replaced[name]
        if not name.endswith("_at"):
            return f"{alias}.{name}"
        if kind == "INTEGER":  # Kling's times, in milliseconds
            return f"{alias}.{name} - c.n * 60000"
        return f"strftime('%Y-%m-%dT%H:%M:%fZ', {alias}.{name}, -c.n || ' minutes')"

    chosen = ", ".join(value(name, kind) for name, kind in columns.items())
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT {chosen} FROM {source}"


class _service:
    """`kling-receiver serve` on the ledger, downloads and polling off; (base URL, cookie)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> tuple[str, str]:
        from receiver.dashboard.session import SESSION_COOKIE, Sessions

        port = _free_port()
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("KLING_", "EVENT_", "DATABASE_", "STORAGE_"))
        }
        env |= {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATA_DIR": str(self.data),
            "ADMIN_TOKEN": _ADMIN_TOKEN,
            "CALLBACK_SECRET": _CALLBACK_SECRET,
            "DOWNLOAD_CONCURRENCY": "0",
            "EVENT_DISPATCH_CONCURRENCY": "0",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "json",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "receiver", "serve"],
            env=env,
            cwd=_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/readyz", trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise BenchError("the service did not become ready within 60 s")
        cookie = Sessions(_ADMIN_TOKEN, secure=False).issue("session", 3600)
        return base, f"{SESSION_COOKIE}={cookie}"

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _deep_cursor(base: str, cookie: str) -> str:
    """The cursor of the 200th page of the task list, followed from the first."""
    path = "/tasks"
    with httpx.Client(base_url=base, headers={"cookie": cookie}, trust_env=False) as client:
        for _ in range(199):
            page = client.get(path)
            found = re.search(r'href="(/tasks\?[^"]*cursor=[^"]+)"', page.text)
            if found is None:
                break
            path = found.group(1).replace("&amp;", "&")
    return path.partition("cursor=")[2]


def _p99(base: str, cookie: str, path: str, requests: int) -> float:
    """Milliseconds of the 99th-percentile answer to `requests` GETs of `path`."""
    times = []
    with httpx.Client(base_url=base, headers={"cookie": cookie}, trust_env=False) as client:
        for n in range(_WARMUP + requests):
            started = time.perf_counter()
            response = client.get(path)
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise BenchError(f"GET {path} answered {response.status_code}")
            if n >= _WARMUP:
                times.append(elapsed)
    return statistics.quantiles(times, n=100)[98]
