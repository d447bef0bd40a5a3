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
  synchronous=FULL) before its 200, and logs one JSON line per delivery;
- unless `--no-ingest-events`, the service on SQLite with one event endpoint
  (EVENT_WEBHOOK_URLS, ALLOW_PRIVATE_EVENT_URLS=true, the default dispatcher
  concurrency): `bench._event_sink`, started for the run in its own process, checks
  each event's signature, counts it and answers 204. After wrk's run the dispatcher
  is given a bounded time to catch up, and what the sink received is set against
  what the outbox holds. `--ingest-events-unsent` adds the same with
  EVENT_DISPATCH_CONCURRENCY=0: the deliveries are written, never sent;
- unless `--no-ingest-postgres`, the service on PostgreSQL (`bench._postgres`: one
  server for the run, a fresh database each run, fsync and synchronous commit on),
  with one receiver, then with two `serve` processes sharing the database and the
  secrets, wrk's threads split between them (one wrk, so one latency histogram).

All are uvicorn in one process per receiver with the options `serve` uses. Each
round runs each subject, in an order shuffled from round to round; the service
gets a fresh DATA_DIR (and database) each run. After each service run it is killed
with SIGKILL and its database is opened: it must hold every delivery that was
answered 200 (and no more than were sent), which the goals check along with every
answer being 2xx.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench import _postgres, _wrk
from bench._core import BenchError, Report, Role, shuffled_rounds
from bench._ingest_load import BLOCK, Workload, build
from bench._ingest_report import (
    BARE,
    EVENTS,
    EVENTS_UNSENT,
    PG_ONE,
    PG_TWO,
    SERVICE,
    EventTally,
    Ledger,
    Sample,
    report,
)
from bench._ledger_read import reading, sqlite_url
from bench._machine import filesystem
from bench._proc import status_kib
from receiver._clock import stamp

__all__ = ["add_arguments", "preflight", "run"]

_NO_POSTGRES = "--no-ingest-postgres"
_EventMode = Literal["sent", "unsent"]  # an endpoint the dispatcher sends to, or none sending
_ROOT = Path(__file__).resolve().parent.parent  # where `python -m bench._ingest_bare` finds bench
_TICK = os.sysconf("SC_CLK_TCK")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


@dataclass(frozen=True, slots=True)
class _Sink:
    """`bench._event_sink`: the event endpoint of one run, in its own process."""

    process: subprocess.Popen[bytes]
    base_url: str

    def stats(self) -> dict[str, Any]:
        status, stats = _http("GET", self.base_url + "/stats")
        if status != 200 or not isinstance(stats, dict):
            raise BenchError(f"the event sink's /stats answered {status}")
        return stats


@dataclass(frozen=True, slots=True)
class _Server:
    """One or more processes serving the same app (the same ledger, for the service)."""

    processes: tuple[subprocess.Popen[bytes], ...]
    base_urls: tuple[str, ...]
    database_url: str = ""  # the service's ledger
    sink: _Sink | None = None  # where its events go, when it has an endpoint
    dispatching: bool = False  # whether its dispatcher sends them

    @property
    def targets(self) -> tuple[str, ...]:
        """Where wrk's threads go, split between the processes when there are several."""
        if len(self.base_urls) == 1:
            return ()
        return tuple(url.removeprefix("http://") for url in self.base_urls)


@dataclass(frozen=True, slots=True)
class _Subject:
    name: str
    role: Role
    start: Callable[[Path], _Server]  # run directory
    postgres: _postgres.Postgres | None = None  # the server its ledger is on


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
    group.add_argument(
        "--ingest-events",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the service with one event endpoint, a local sink answering 204 (default: on)",
    )
    group.add_argument(
        "--ingest-events-unsent",
        action="store_true",
        help="also the service with the endpoint set and EVENT_DISPATCH_CONCURRENCY=0: "
        "deliveries written, never sent (to see what sending costs)",
    )
    group.add_argument(
        "--ingest-events-concurrency",
        type=int,
        metavar="N",
        help="EVENT_DISPATCH_CONCURRENCY for the run with an endpoint (default: unset, the "
        "service's default)",
    )
    group.add_argument(
        "--ingest-events-drain",
        type=float,
        default=60.0,
        help="seconds, after each run with an endpoint, the dispatcher may take to send what "
        "is left before the figures are read (default 60)",
    )
    group.add_argument(
        "--ingest-postgres",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the service on PostgreSQL, with 1 and 2 receivers (default: on; "
        "needs Debian's postgresql server binaries)",
    )


def preflight(options: argparse.Namespace) -> None:
    """Fail before any benchmark runs when PostgreSQL is wanted and not installed."""
    if options.ingest_postgres:
        _postgres.require(f"pass {_NO_POSTGRES}")


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


def _start_sink(directory: Path, event_secret: str) -> _Sink:
    log = directory / "sink.log"
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "bench._event_sink",
        "--port",
        str(port),
        "--secret",
        event_secret,
    ]
    process = _spawn(command, _base_env(), _ROOT, log)
    sink = _Sink(process, f"http://127.0.0.1:{port}")

    def ready() -> bool:
        return "received" in sink.stats()

    _wait_ready(process, log, ready, "the event sink")
    return sink


@dataclass(frozen=True, slots=True)
class _Secrets:
    callback: str
    admin_token: str
    event: str  # EVENT_WEBHOOK_SECRET, a whsec_ key


def _start_service(
    keys: _Secrets,
    receivers: int = 1,
    postgres: _postgres.Postgres | None = None,
    events: _EventMode | None = None,
    concurrency: int | None = None,
) -> Callable[[Path], _Server]:
    """`receivers` serve processes on one ledger: SQLite in the first one's DATA_DIR, or a
    fresh database on `postgres`. They share the secrets, so each takes the others' URLs.
    With `events`, a fresh event sink is their one endpoint, sent to with `concurrency`
    (None: the service's default) unless `events` is "unsent"."""

    def start(directory: Path) -> _Server:
        if postgres is None:
            database = sqlite_url(directory / "data-0" / "kling-receiver.db")
        else:
            database = postgres.create_database()
        processes: list[subprocess.Popen[bytes]] = []
        bases: list[str] = []
        sink = None
        extra: dict[str, str] = {}
        try:
            if events is not None:
                sink = _start_sink(directory, keys.event)
                extra = {
                    "EVENT_WEBHOOK_URLS": sink.base_url + "/events",
                    "ALLOW_PRIVATE_EVENT_URLS": "true",
                }
                if events == "unsent":
                    extra["EVENT_DISPATCH_CONCURRENCY"] = "0"
                elif concurrency is not None:
                    extra["EVENT_DISPATCH_CONCURRENCY"] = str(concurrency)
            for number in range(receivers):
                port = _free_port()
                env = (
                    _base_env()
                    | {
                        "HOST": "127.0.0.1",
                        "PORT": str(port),
                        "DATA_DIR": str(directory / f"data-{number}"),
                        "DATABASE_URL": database,
                        "CALLBACK_SECRET": keys.callback,
                        "ADMIN_TOKEN": keys.admin_token,
                        "EVENT_WEBHOOK_SECRET": keys.event,
                        "DOWNLOAD_CONCURRENCY": "0",
                        "LOG_LEVEL": "INFO",
                    }
                    | extra
                )
                # cwd: the scratch directory, so that no .env of the checkout is read.
                log = directory / f"service-{number}.log"
                processes.append(_spawn([*_service_command(), "serve"], env, directory, log))
                bases.append(f"http://127.0.0.1:{port}")
            for number, (process, base) in enumerate(zip(processes, bases, strict=True)):
                _wait_ready(
                    process,
                    directory / f"service-{number}.log",
                    _service_ready(base, keys.admin_token),
                    "kling-receiver serve",
                )
        except BaseException:
            for process in processes:
                _stop(process, signal.SIGKILL)
            if sink is not None:
                _stop(sink.process)
            if postgres is not None:
                postgres.drop_database(database)
            raise
        return _Server(tuple(processes), tuple(bases), database, sink, events == "sent")

    return start


def _service_ready(base: str, admin_token: str) -> Callable[[], bool]:
    def ready() -> bool:
        # /api/stats with our token: this service, not another that took the port first.
        auth = {"Authorization": f"Bearer {admin_token}"}
        return _http("GET", base + "/readyz")[0] == 200 and (
            _http("GET", base + "/api/stats", headers=auth)[0] == 200
        )

    return ready


def _start_bare(directory: Path) -> _Server:
    log = directory / "bare.log"
    port = _free_port()
    command = [sys.executable, "-m", "bench._ingest_bare", "--port", str(port)]
    process = _spawn(command, _base_env(), _ROOT, log)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        status, answer = _http("POST", base + "/callbacks/kling/probe", b'{"task_id": "probe"}', {})
        return status == 200 and isinstance(answer, dict) and answer.get("bare") is True

    _wait_ready(process, log, ready, "the bare app")
    return _Server((process,), (base,))


@contextmanager
def _serving(subject: _Subject, directory: Path) -> Iterator[_Server]:
    directory.mkdir(parents=True)
    server = subject.start(directory)
    try:
        yield server
    finally:
        for process in server.processes:
            _stop(process)
        if server.sink is not None:
            _stop(server.sink.process)
        if subject.postgres is not None:
            subject.postgres.drop_database(server.database_url)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


# -- the service's ledger --------------------------------------------------------


def _settled_stats(base_url: str, admin_token: str) -> dict[str, Any]:
    """/api/stats once the deliveries wrk left in flight are done (two equal reads)."""
    auth = {"Authorization": f"Bearer {admin_token}"}
    last: dict[str, Any] | None = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, stats = _http("GET", base_url + "/api/stats", headers=auth)
        if status != 200 or not isinstance(stats, dict):
            raise BenchError(f"/api/stats answered {status}")
        if stats == last:
            return stats
        last = stats
        time.sleep(0.25)
    raise BenchError("the service's counters did not settle within 10 s of the run")


def _ledger(database_url: str, stats: list[dict[str, Any]], answered_ok: int) -> Ledger:
    """What the database holds, beside what the service's processes counted (`stats`)."""
    with reading(database_url) as query:
        ((events, recorded),) = query(
            "SELECT count(*), coalesce(sum(times_received), 0) FROM events"
            " WHERE source = 'callback'"
        )
        ((tasks,),) = query("SELECT count(*) FROM tasks")
        ((assets,),) = query("SELECT count(*) FROM assets")
        ((outbound,),) = query("SELECT count(*) FROM outbox")
    outcomes: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    for one in stats:
        outcomes.update({str(k): int(v) for k, v in one["deliveries"].items()})
        refused.update({str(k): int(v) for k, v in one["refused"].items()})
    return Ledger(
        answered_ok=answered_ok,
        counted=sum(outcomes.values()),
        recorded=int(recorded),
        events=int(events),
        tasks=int(tasks),
        assets=int(assets),
        outbound=int(outbound),
        outcomes=dict(outcomes),
        refused={k: v for k, v in refused.items() if v},
    )


# -- the service's events --------------------------------------------------------


def _event_counts(server: _Server) -> tuple[int, int]:
    """(deliveries written for the endpoint, distinct events the sink has taken), now."""
    assert server.sink is not None
    with reading(server.database_url) as query:
        ((written,),) = query("SELECT count(*) FROM event_deliveries")
    return int(written), int(server.sink.stats()["distinct"])


@dataclass(frozen=True, slots=True)
class _Drained:
    """The dispatcher sending what was left once wrk stopped."""

    seconds: float  # until no delivery was left, or the bound
    done: bool  # whether none was left
    cpu_seconds: float  # the service's, meanwhile
    sent: int  # events the sink took meanwhile


def _drain(server: _Server, bound: float) -> _Drained:
    """Wait until no delivery is left to send, at most `bound` seconds."""
    assert server.sink is not None
    pids = [process.pid for process in server.processes]
    cpu_before = sum(_cpu_seconds(pid) for pid in pids)
    sent_before = int(server.sink.stats()["distinct"])
    started = time.monotonic()
    while True:
        with reading(server.database_url) as query:
            ((waiting,),) = query("SELECT count(*) FROM event_deliveries WHERE state = 'pending'")
        elapsed = time.monotonic() - started
        if not waiting or elapsed >= bound:
            break
        time.sleep(0.1)
    return _Drained(
        elapsed,
        not waiting,
        sum(_cpu_seconds(pid) for pid in pids) - cpu_before,
        int(server.sink.stats()["distinct"]) - sent_before,
    )


def _event_tally(
    server: _Server,
    start: tuple[int, int],
    end: tuple[int, int],
    drained: _Drained | None,
    sink_cpu: float,
    measured: tuple[float, float],
) -> EventTally:
    """What the outbox and the sink hold once the service is gone (SIGKILLed); `measured`:
    when wrk's measured run began and ended (time.time())."""
    assert server.sink is not None
    began, ended = (stamp(t) for t in measured)
    with reading(server.database_url) as query:
        ((outbox,),) = query("SELECT count(*) FROM outbox")
        states = query("SELECT state, count(*) FROM event_deliveries GROUP BY state")
        attempts = query("SELECT at, latency_ms FROM event_attempts")
    stats = server.sink.stats()
    return EventTally(
        dispatching=server.dispatching,
        written_start=start[0],
        sent_start=start[1],
        written_end=end[0],
        sent_end=end[1],
        drain_seconds=drained.seconds if drained is not None and drained.done else None,
        drain_rate=drained.sent / drained.seconds if drained and drained.seconds else None,
        drain_cpu_per_event=(
            drained.cpu_seconds / drained.sent if drained is not None and drained.sent else None
        ),
        outbox=int(outbox),
        deliveries={str(state): int(n) for state, n in states},
        received=int(stats["received"]),
        distinct=int(stats["distinct"]),
        bad_signature=int(stats["bad_signature"]),
        types={str(k): int(v) for k, v in stats["types"].items()},
        sink_cpu_seconds=sink_cpu,
        sink_cpu_total=_cpu_seconds(server.sink.process.pid),
        attempt_ms=tuple(sorted(float(ms) for _, ms in attempts)),
        attempt_ms_measured=tuple(sorted(float(ms) for at, ms in attempts if began <= at <= ended)),
    )


# -- measuring -----------------------------------------------------------------


def _measure_one(
    subject: _Subject,
    directory: Path,
    options: argparse.Namespace,
    binary: str,
    workload: Workload,
    admin_token: str,
) -> Sample:
    def drive(server: _Server, seconds: int, start: int) -> _wrk.Result:
        return _wrk.run(
            binary,
            server.base_urls[0],
            workload.script,
            seconds=seconds,
            connections=options.ingest_connections,
            threads=options.ingest_threads,
            args=[str(start), str(options.ingest_threads)],
            targets=server.targets,
        )

    def database_cpu() -> float:
        return subject.postgres.cpu_seconds() if subject.postgres is not None else 0.0

    def sink_cpu(server: _Server) -> float:
        return _cpu_seconds(server.sink.process.pid) if server.sink is not None else 0.0

    with _serving(subject, directory) as server:
        pids = [process.pid for process in server.processes]
        rss_before = [status_kib("VmRSS", pid) for pid in pids]
        warmup = drive(server, options.ingest_warmup, 0)
        start = max(thread["next_position"] for thread in warmup.threads)
        events_start = _event_counts(server) if server.sink is not None else (0, 0)
        cpu_before = sum(_cpu_seconds(pid) for pid in pids)
        database_before = database_cpu()
        sink_before = sink_cpu(server)
        began = time.time()
        measured = drive(server, options.ingest_seconds, start)
        ended = time.time()
        cpu = sum(_cpu_seconds(pid) for pid in pids) - cpu_before
        database = database_cpu() - database_before
        sink_seconds = sink_cpu(server) - sink_before
        growth = max(
            status_kib("VmHWM", pid) - before for pid, before in zip(pids, rss_before, strict=True)
        )
        positions = max(thread["next_position"] for thread in measured.threads)
        events_end = (0, 0)
        drained = None
        if server.sink is not None:
            events_end = _event_counts(server)
            if server.dispatching:
                drained = _drain(server, options.ingest_events_drain)
        ledger = None
        tally = None
        if subject.role is not Role.baseline:
            stats = [_settled_stats(base, admin_token) for base in server.base_urls]
            # Killed, not stopped: whatever was answered 200 must already be in the database.
            for process in server.processes:
                _stop(process, signal.SIGKILL)
            ledger = _ledger(server.database_url, stats, warmup.ok + measured.ok)
            if server.sink is not None:
                tally = _event_tally(
                    server, events_start, events_end, drained, sink_seconds, (began, ended)
                )
    if subject.role is Role.baseline:
        errors = measured.non_2xx + measured.socket_errors + warmup.non_2xx + warmup.socket_errors
        if errors:
            log = (directory / "bare.log").read_text(errors="replace")[-2000:]
            raise BenchError(f"{subject.name}: {errors} requests failed; its log ends:\n{log}")
    for data in directory.glob("data-*"):
        shutil.rmtree(data, ignore_errors=True)
    return Sample(
        measured,
        warmup,
        cpu,
        growth / 1024,
        positions,
        ledger,
        database if subject.postgres is not None else None,
        tally,
    )


def _measure(
    subjects: list[_Subject],
    scratch: Path,
    options: argparse.Namespace,
    binary: str,
    workload: Workload,
    admin_token: str,
    seed: int,
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {s.name: [] for s in subjects}
    for number, subject in shuffled_rounds(subjects, options.rounds, seed):
        directory = scratch / f"round-{number}-{len(samples[subject.name])}-{_slug(subject)}"
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


def _slug(subject: _Subject) -> str:
    return {
        BARE: "bare",
        SERVICE: "sqlite",
        EVENTS: "events",
        EVENTS_UNSENT: "events-unsent",
        PG_ONE: "pg-1",
        PG_TWO: "pg-2",
    }[subject.name]


def run(options: argparse.Namespace) -> Report:
    """Serve the bare app and the service in turn, and drive each with wrk, round after round."""
    for name in ("seconds", "warmup", "connections", "threads", "tasks"):
        if getattr(options, f"ingest_{name}") < 1:
            raise BenchError(f"--ingest-{name} must be at least 1")
    if options.ingest_events_concurrency is not None and not (
        1 <= options.ingest_events_concurrency <= 64
    ):
        raise BenchError("--ingest-events-concurrency must be from 1 to 64")
    if options.ingest_events_drain < 0:
        raise BenchError("--ingest-events-drain must be at least 0")
    if options.ingest_connections < options.ingest_threads:
        raise BenchError("--ingest-connections must be at least --ingest-threads")
    if options.ingest_postgres and options.ingest_threads % 2:
        raise BenchError(
            f"--ingest-threads must be even to split them over 2 receivers (or pass {_NO_POSTGRES})"
        )
    bindir = _postgres.require(f"pass {_NO_POSTGRES}") if options.ingest_postgres else None
    binary = _wrk.ensure_installed()
    seed = options.ingest_seed if options.ingest_seed is not None else random.randrange(1 << 16)
    keys = _Secrets(
        secrets.token_urlsafe(32),
        secrets.token_urlsafe(32),
        "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
    )
    scratch = Path(tempfile.mkdtemp(prefix="kling-bench-ingest-", dir=options.dir))
    try:
        with ExitStack() as stack:
            subjects = [
                _Subject(BARE, Role.baseline, _start_bare),
                _Subject(SERVICE, Role.subject, _start_service(keys)),
            ]
            if options.ingest_events:
                start = _start_service(
                    keys, events="sent", concurrency=options.ingest_events_concurrency
                )
                subjects.append(_Subject(EVENTS, Role.subject, start))
            if options.ingest_events_unsent:
                start = _start_service(keys, events="unsent")
                subjects.append(_Subject(EVENTS_UNSENT, Role.reference, start))
            postgres = None
            if bindir is not None:
                postgres = stack.enter_context(_postgres.serving(options.dir, bindir))
                for name, receivers in ((PG_ONE, 1), (PG_TWO, 2)):
                    start = _start_service(keys, receivers, postgres)
                    subjects.append(_Subject(name, Role.subject, start, postgres))
            tasks = max(options.ingest_tasks, BLOCK * options.ingest_threads)  # a block per thread
            workload = build(scratch / "workload", keys.callback, tasks=tasks, seed=seed)
            samples = _measure(subjects, scratch, options, binary, workload, keys.admin_token, seed)
            disk = filesystem(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    database = postgres.version if postgres is not None else None
    return report(options, seed, _wrk.version(binary), workload, samples, disk, database)
