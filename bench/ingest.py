"""Ingest: callbacks per second and latency of `kling-receiver serve`, against a bare app.

wrk (from Debian) drives both servers the same way, one at a time: 64
connections, 2 threads, a warm-up, then the measured run, with the same Lua
workload (see `bench._ingest_load`): callbacks of many tasks, each to its own
signed URL, in a realistic mix of statuses, duplicates and late deliveries,
bodies of 1-2 KB. The subjects are

- the baseline, `bench._ingest_bare`: a bare Starlette app that reads the body,
  parses the JSON and answers 200;
- the service, `kling-receiver serve`, which checks the URL's signature,
  parses and validates the task, records the delivery in SQLite (committed,
  synchronous=FULL) before its 200, and logs one JSON line per delivery.

Both are uvicorn in one process with the options `serve` uses. Each round
runs both, in an order shuffled from round to round; the service gets a fresh
DATA_DIR each round. After each service run it is killed with SIGKILL and its
database is opened: it must hold every delivery that was answered 200 (and no
more than were sent), which the goals check along with every answer being 2xx.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _wrk
from bench._core import BenchError, Goal, Report, Role, Row, paired_ratio, shuffled_rounds
from bench._ingest_load import BLOCK, Workload, build
from bench._machine import filesystem
from bench._proc import status_kib

__all__ = ["add_arguments", "run"]

_RATIO_GOAL = 0.5
_P99_GOAL_MS = 50.0
_BARE = "bare Starlette app: json.loads, 200"
_SERVICE = "kling-receiver serve: check, record, 200"
_ROOT = Path(__file__).resolve().parent.parent  # where `python -m bench._ingest_bare` finds bench
_TICK = os.sysconf("SC_CLK_TCK")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


@dataclass(frozen=True, slots=True)
class _Ledger:
    """What the service said it recorded, and what its database holds after a SIGKILL."""

    answered_ok: int  # 2xx answers wrk received, warm-up and measured run together
    counted: int  # deliveries the service counted as recorded (/api/stats)
    recorded: int  # deliveries in the database (events.times_received, summed)
    events: int  # distinct deliveries kept
    tasks: int
    assets: int
    outcomes: dict[str, int]
    refused: dict[str, int]


@dataclass(frozen=True, slots=True)
class _Sample:
    measured: _wrk.Result
    warmup: _wrk.Result
    server_cpu_seconds: float  # the server process's user + system time in the measured run
    rss_growth_mib: float
    positions: int  # deliveries per wrk thread reached by the end of the measured run
    ledger: _Ledger | None = None


@dataclass(frozen=True, slots=True)
class _Server:
    process: subprocess.Popen[bytes]
    base_url: str


@dataclass(frozen=True, slots=True)
class _Subject:
    name: str
    role: Role
    start: Callable[[Path, int], _Server]  # round directory, port


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """--ingest-seconds, --ingest-warmup, --ingest-connections, ..."""
    group.add_argument(
        "--ingest-seconds", type=int, default=10, help="measured seconds per run (default 10)"
    )
    group.add_argument(
        "--ingest-warmup", type=int, default=2, help="warm-up seconds before each, >= 1 (default 2)"
    )
    group.add_argument(
        "--ingest-connections", type=int, default=64, help="wrk connections (default 64)"
    )
    group.add_argument("--ingest-threads", type=int, default=2, help="wrk threads (default 2)")
    group.add_argument(
        "--ingest-tasks",
        type=int,
        default=20000,
        help="tasks in the workload's pool, before they come round again (default 20000)",
    )
    group.add_argument(
        "--ingest-seed",
        type=int,
        help="seed for the workload and the order of subjects (default: random)",
    )


# -- processes -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _base_env() -> dict[str, str]:
    """This environment less proxies and anything the service would read as a setting."""
    from receiver.settings import Settings

    settings = {name.upper() for name in Settings.model_fields}
    return {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy") and key.upper() not in settings
    }


def _http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _wait_ready(
    process: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool], what: str
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{what} exited with {process.returncode}:\n{tail}")
        try:
            if ready():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    _stop(process, signal.SIGKILL)
    raise BenchError(f"{what} did not become ready in 30 s:\n{log.read_text(errors='replace')}")


def _stop(process: subprocess.Popen[bytes], how: signal.Signals = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(how)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _service_command() -> list[str]:
    script = Path(sys.executable).parent / "kling-receiver"
    return [str(script)] if script.exists() else [sys.executable, "-m", "receiver"]


def _spawn(
    command: list[str], env: dict[str, str], cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    """A server process with no stdin, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _start_service(secret: str, admin_token: str) -> Callable[[Path, int], _Server]:
    def start(directory: Path, port: int) -> _Server:
        env = _base_env() | {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATA_DIR": str(directory / "data"),
            "CALLBACK_SECRET": secret,
            "ADMIN_TOKEN": admin_token,
            "DOWNLOAD_CONCURRENCY": "0",
            "LOG_LEVEL": "INFO",
        }
        log = directory / "service.log"
        # cwd: the scratch directory, so that no .env of the checkout is read.
        process = _spawn([*_service_command(), "serve"], env, directory, log)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            # /api/stats with our token: this service, not another that took the port first.
            auth = {"Authorization": f"Bearer {admin_token}"}
            return _http("GET", base + "/readyz")[0] == 200 and (
                _http("GET", base + "/api/stats", headers=auth)[0] == 200
            )

        _wait_ready(process, log, ready, "kling-receiver serve")
        return _Server(process, base)

    return start


def _start_bare(directory: Path, port: int) -> _Server:
    log = directory / "bare.log"
    command = [sys.executable, "-m", "bench._ingest_bare", "--port", str(port)]
    process = _spawn(command, _base_env(), _ROOT, log)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        status, answer = _http("POST", base + "/callbacks/kling/probe", b'{"task_id": "probe"}', {})
        return status == 200 and isinstance(answer, dict) and answer.get("bare") is True

    _wait_ready(process, log, ready, "the bare app")
    return _Server(process, base)


@contextmanager
def _serving(subject: _Subject, directory: Path) -> Iterator[_Server]:
    directory.mkdir(parents=True)
    server = subject.start(directory, _free_port())
    try:
        yield server
    finally:
        _stop(server.process)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


# -- the service's ledger --------------------------------------------------------


def _settled_stats(server: _Server, admin_token: str) -> dict[str, Any]:
    """/api/stats once the deliveries wrk left in flight are done (two equal reads)."""
    auth = {"Authorization": f"Bearer {admin_token}"}
    last: dict[str, Any] | None = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, stats = _http("GET", server.base_url + "/api/stats", headers=auth)
        if status != 200 or not isinstance(stats, dict):
            raise BenchError(f"/api/stats answered {status}")
        if stats == last:
            return stats
        last = stats
        time.sleep(0.25)
    raise BenchError("the service's counters did not settle within 10 s of the run")


def _ledger(directory: Path, stats: dict[str, Any], answered_ok: int) -> _Ledger:
    conn = sqlite3.connect(directory / "data" / "kling-receiver.db")
    try:
        events, recorded = conn.execute(
            "SELECT count(*), coalesce(sum(times_received), 0) FROM events"
            " WHERE source = 'callback'"
        ).fetchone()
        tasks = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
        assets = conn.execute("SELECT count(*) FROM assets").fetchone()[0]
    finally:
        conn.close()
    outcomes = {str(k): int(v) for k, v in stats["deliveries"].items()}
    return _Ledger(
        answered_ok=answered_ok,
        counted=sum(outcomes.values()),
        recorded=recorded,
        events=events,
        tasks=tasks,
        assets=assets,
        outcomes=outcomes,
        refused={str(k): int(v) for k, v in stats["refused"].items()},
    )


# -- measuring -----------------------------------------------------------------


def _measure_one(
    subject: _Subject,
    directory: Path,
    options: argparse.Namespace,
    binary: str,
    workload: Workload,
    admin_token: str,
) -> _Sample:
    def drive(url: str, seconds: int, start: int) -> _wrk.Result:
        return _wrk.run(
            binary,
            url,
            workload.script,
            seconds=seconds,
            connections=options.ingest_connections,
            threads=options.ingest_threads,
            args=[str(start), str(options.ingest_threads)],
        )

    with _serving(subject, directory) as server:
        pid = server.process.pid
        rss_before = status_kib("VmRSS", pid)
        warmup = drive(server.base_url, options.ingest_warmup, 0)
        start = max(thread["next_position"] for thread in warmup.threads)
        cpu_before = _cpu_seconds(pid)
        measured = drive(server.base_url, options.ingest_seconds, start)
        cpu = _cpu_seconds(pid) - cpu_before
        growth = (status_kib("VmHWM", pid) - rss_before) / 1024
        positions = max(thread["next_position"] for thread in measured.threads)
        ledger = None
        if subject.role is Role.subject:
            stats = _settled_stats(server, admin_token)
            # Killed, not stopped: whatever was answered 200 must already be in the database.
            _stop(server.process, signal.SIGKILL)
            ledger = _ledger(directory, stats, warmup.ok + measured.ok)
    if subject.role is Role.baseline:
        errors = measured.non_2xx + measured.socket_errors + warmup.non_2xx + warmup.socket_errors
        if errors:
            log = (directory / "bare.log").read_text(errors="replace")[-2000:]
            raise BenchError(f"{subject.name}: {errors} requests failed; its log ends:\n{log}")
    shutil.rmtree(directory / "data", ignore_errors=True)
    return _Sample(measured, warmup, cpu, growth, positions, ledger)


def _measure(
    subjects: list[_Subject],
    scratch: Path,
    options: argparse.Namespace,
    binary: str,
    workload: Workload,
    admin_token: str,
    seed: int,
) -> dict[str, list[_Sample]]:
    samples: dict[str, list[_Sample]] = {s.name: [] for s in subjects}
    for number, subject in shuffled_rounds(subjects, options.rounds, seed):
        directory = scratch / f"round-{number}-{subject.role.value}"
        sample = _measure_one(subject, directory, options, binary, workload, admin_token)
        samples[subject.name].append(sample)
        result = sample.measured
        print(
            f"bench: ingest round {number}/{options.rounds}: {subject.name}: "
            f"{result.per_second:.0f} req/s, p50 {result.p50_ms:.1f} ms, "
            f"p99 {result.p99_ms:.1f} ms, non-2xx {result.non_2xx}, "
            f"socket errors {result.socket_errors}",
            file=sys.stderr,
            flush=True,
        )
    return samples


def run(options: argparse.Namespace) -> Report:
    """Serve the bare app and the service in turn, and drive each with wrk, round after round."""
    for name in ("seconds", "warmup", "connections", "threads", "tasks"):
        if getattr(options, f"ingest_{name}") < 1:
            raise BenchError(f"--ingest-{name} must be at least 1")
    if options.ingest_connections < options.ingest_threads:
        raise BenchError("--ingest-connections must be at least --ingest-threads")
    binary = _wrk.ensure_installed()
    seed = options.ingest_seed if options.ingest_seed is not None else random.randrange(1 << 16)
    secret, admin_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    subjects = [
        _Subject(_BARE, Role.baseline, _start_bare),
        _Subject(_SERVICE, Role.subject, _start_service(secret, admin_token)),
    ]
    scratch = Path(tempfile.mkdtemp(prefix="kling-bench-ingest-", dir=options.dir))
    try:
        tasks = max(options.ingest_tasks, BLOCK * options.ingest_threads)  # a block per thread
        workload = build(scratch / "workload", secret, tasks=tasks, seed=seed)
        samples = _measure(subjects, scratch, options, binary, workload, admin_token, seed)
        disk = filesystem(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _report(options, seed, _wrk.version(binary), workload, samples, disk)


# -- the report ----------------------------------------------------------------


def _server_stack() -> str:
    try:
        uvicorn = importlib.metadata.version("uvicorn")
    except importlib.metadata.PackageNotFoundError:
        uvicorn = "?"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn {uvicorn}, 1 process, {loop} loop, {http}"


def _ledger_problems(name: str, round_number: int, sample: _Sample, connections: int) -> list[str]:
    problems = []
    runs = (sample.warmup, sample.measured)
    non_2xx = sum(r.non_2xx for r in runs)
    socket_errors = sum(r.socket_errors for r in runs)
    if non_2xx:
        problems.append(f"round {round_number}: {non_2xx} answers were not 2xx")
    if socket_errors:
        problems.append(f"round {round_number}: {socket_errors} socket errors or timeouts")
    ledger = sample.ledger
    if ledger is None:
        return problems
    if ledger.refused:
        problems.append(f"round {round_number}: refused {ledger.refused}")
    if ledger.recorded != ledger.counted:
        problems.append(
            f"round {round_number}: the service counted {ledger.counted} recorded deliveries,"
            f" the database holds {ledger.recorded}"
        )
    if ledger.recorded < ledger.answered_ok:
        problems.append(
            f"round {round_number}: {ledger.answered_ok} deliveries answered 2xx,"
            f" only {ledger.recorded} in the database after SIGKILL"
        )
    # What wrk left in flight when each of its two runs ended may be recorded, unanswered.
    if ledger.recorded > ledger.answered_ok + len(runs) * connections:
        problems.append(
            f"round {round_number}: the database holds {ledger.recorded} deliveries,"
            f" more than the {ledger.answered_ok} answered plus those in flight"
        )
    return [f"{name}: {p}" for p in problems]


def _report(
    options: argparse.Namespace,
    seed: int,
    wrk_version: str,
    workload: Workload,
    samples: dict[str, list[_Sample]],
    disk: str,
) -> Report:
    bare, service = samples[_BARE], samples[_SERVICE]
    bare_rps = [s.measured.per_second for s in bare]
    service_rps = [s.measured.per_second for s in service]
    ratio = paired_ratio(service_rps, bare_rps)

    def latency_rows(runs: list[_Sample], role: Role) -> list[Row]:
        return [
            Row("  p50 latency", role, "ms", tuple(s.measured.p50_ms for s in runs)),
            Row("  p99 latency", role, "ms", tuple(s.measured.p99_ms for s in runs)),
        ]

    rows = (
        Row(
            _BARE, Role.baseline, "req/s", tuple(bare_rps), 1.0, max(s.rss_growth_mib for s in bare)
        ),
        *latency_rows(bare, Role.baseline),
        Row(
            _SERVICE,
            Role.subject,
            "req/s",
            tuple(service_rps),
            ratio,
            max(s.rss_growth_mib for s in service),
        ),
        *latency_rows(service, Role.subject),
    )
    p99 = statistics.median(s.measured.p99_ms for s in service)
    worst_p99 = max(s.measured.p99_ms for s in service)
    problems = [
        problem
        for name, runs in ((_SERVICE, service),)
        for number, sample in enumerate(runs, start=1)
        for problem in _ledger_problems(name, number, sample, options.ingest_connections)
    ]
    answered = sum(s.ledger.answered_ok for s in service if s.ledger)
    recorded = sum(s.ledger.recorded for s in service if s.ledger)
    goals = (
        Goal(
            f"service / bare app >= {_RATIO_GOAL:.2f} (req/s)", f"{ratio:.2f}", ratio >= _RATIO_GOAL
        ),
        Goal(
            f"service p99 < {_P99_GOAL_MS:.0f} ms (median of rounds)",
            f"{p99:.1f} ms (worst {worst_p99:.1f})",
            p99 < _P99_GOAL_MS,
        ),
        Goal(
            "every answer 2xx; every 200 in the ledger after SIGKILL",
            f"{answered} answered, {recorded} recorded",
            not problems,
        ),
    )
    sizes = workload.body_bytes
    smallest = min(lo for lo, _, _ in sizes.values())
    largest = max(hi for _, _, hi in sizes.values())
    medians = ", ".join(f"{kind} {median}" for kind, (_, median, _) in sizes.items())
    mix = ", ".join(f"{kind} {share:.0%}" for kind, share in workload.mix.items())
    setup = (
        f"load     {wrk_version}, {options.ingest_threads} threads,"
        f" {options.ingest_connections} connections, closed loop; per subject and round"
        f" {options.ingest_warmup} s warm-up, then {options.ingest_seconds} s measured",
        f"bodies   Kling callbacks, each task to its own signed URL: {mix};"
        f" {workload.duplicate_share:.1%} sent twice, {workload.out_of_order_share:.1%} of tasks"
        f" with processing after the end",
        f"         {smallest}-{largest} B (median by status: {medians}); {workload.families};"
        f" pool of {workload.tasks} tasks",
        f"servers  {_server_stack()}, access log off: the options `serve` uses, for both",
        "service  fresh DATA_DIR each round, SQLite WAL synchronous=FULL; DOWNLOAD_CONCURRENCY=0;"
        " no Kling API key (no poller); LOG_LEVEL=INFO: one JSON line per delivery, to a file",
        f"disk     scratch and DATA_DIR on {disk}",
        f"rounds   {options.rounds}, subject order shuffled each round (--ingest-seed {seed})",
        f"ratio    median over rounds of (service req/s / {_BARE} req/s in the same round)",
    )
    notes = _notes(options, workload, bare, service, problems, disk)
    return Report("ingest", setup, rows, goals, tuple(notes))


def _notes(
    options: argparse.Namespace,
    workload: Workload,
    bare: list[_Sample],
    service: list[_Sample],
    problems: list[str],
    disk: str,
) -> list[str]:
    def per_request_us(runs: list[_Sample]) -> float:
        return statistics.median(
            s.server_cpu_seconds / s.measured.requests * 1e6 for s in runs if s.measured.requests
        )

    def wrk_cores(runs: list[_Sample]) -> float:
        return statistics.median(s.measured.cpu_seconds / s.measured.seconds for s in runs)

    def server_cores(runs: list[_Sample]) -> float:
        return statistics.median(s.server_cpu_seconds / s.measured.seconds for s in runs)

    outcomes: Counter[str] = Counter()
    for sample in service:
        if sample.ledger:
            outcomes.update(sample.ledger.outcomes)
    total = sum(outcomes.values()) or 1
    last = service[-1].ledger
    notes = [
        "latency is wrk's: from writing a request to reading its whole answer, on"
        f" {options.ingest_connections} connections each waiting for its answer before the next"
        " request (closed loop: no coordinated-omission correction); p50/p99 per round"
        " as wrk's histogram gives them.",
        f"with all {options.ingest_connections} connections always waiting, mean latency is"
        f" {options.ingest_connections} / throughput (Little's law): a p99 under"
        f" {_P99_GOAL_MS:.0f} ms needs well over"
        f" {options.ingest_connections / (_P99_GOAL_MS / 1000):.0f} req/s.",
        f"server CPU per request (user + system of the server process over the measured run,"
        f" median): bare {per_request_us(bare):.0f} us, service {per_request_us(service):.0f} us."
        f" Cores used, bare / service runs: server {server_cores(bare):.2f} /"
        f" {server_cores(service):.2f}, wrk {wrk_cores(bare):.2f} / {wrk_cores(service):.2f},"
        f" of the {os.cpu_count()} they share with each other and whatever else runs.",
        "the service's outcomes over all rounds: "
        + ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(outcomes.items()))
        + (
            f"; last round's ledger: {last.tasks} tasks, {last.events} distinct deliveries,"
            f" {last.assets} assets queued (not downloaded)"
            if last
            else ""
        ),
        "every service run ends with SIGKILL; the database is then opened and must hold each"
        " delivery that was answered 200 (answered <= recorded <= answered + those in flight"
        " when wrk stopped), and exactly what the service counted.",
    ]
    wrapped = max(s.positions for s in service) - workload.capacity(options.ingest_threads)
    if wrapped > 0:
        notes.append(
            f"the pool of {workload.tasks} tasks came round again: up to"
            f" {wrapped * options.ingest_threads} deliveries of a service round repeated earlier"
            " ones (duplicates, cheaper than new deliveries); raise --ingest-tasks"
        )
    if "tmpfs" in disk:
        notes.append("the scratch directory is on tmpfs: no disk was measured; pass --dir")
    notes += problems
    return notes
