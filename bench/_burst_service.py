"""The burst's subject: a real `kling-receiver serve` taking N succeed callbacks at once.

`run_service` starts the service on a free port of 127.0.0.1 with a fresh data
directory (and, given a PostgreSQL, a fresh database on it), delivers every callback
(`bench._burst_send`: `connections` at a time, as fast as they are answered or spread
over `window` seconds), waits until the ledger says every task is archived, reads the
processes' peak RSS, stops them and checks what was stored: every task archived, one
stored asset per task with the source's sha256 and size, and exactly N files (plus
their sidecars) on disk. With `workers`, the service downloads nothing
(DOWNLOAD_CONCURRENCY=0) and that many `kling-receiver worker` processes, started
before the burst, share the downloads; with `queue_first` they are held stopped
(SIGSTOP) until every callback is answered, then released together (SIGCONT) to drain
the full queue.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from bench._burst_send import Answer, post_all
from bench._burst_tasks import ACTION, Task
from bench._core import BenchError
from bench._ledger_read import Reader, reading, sqlite_url
from bench._postgres import Postgres
from bench._proc import status_kib
from receiver import tokens
from receiver.settings import Settings

__all__ = ["ServiceRun", "run_service"]

_ROOT = Path(__file__).resolve().parent.parent  # where `python -m receiver` finds its code
_STALL_SECONDS = 300.0  # no task archived for this long: the run is stuck
_TICK = os.sysconf("SC_CLK_TCK")

Popen = subprocess.Popen[bytes]


@dataclass(frozen=True, slots=True)
class ServiceRun:
    """What one burst through the service took."""

    archive_seconds: float  # first delivery sent -> last task archived (the ledger's time)
    deliver_seconds: float  # first delivery sent -> last delivery answered
    latency_ms_median: float
    latency_ms_p99: float
    rss_before_mib: float  # VmRSS once ready, before the burst
    peak_rss_mib: float  # VmHWM at the end
    rss_growth_mib: float  # VmHWM at the end - VmRSS before (VmHWM reset before when allowed)
    peak_reset: bool  # whether VmHWM could be reset to VmRSS before the burst
    attempts: int  # download attempts over all assets (N when none was retried)
    log_lines: int
    cpu_seconds: float  # the service's user + system time during the burst
    worker_cpu_seconds: float = 0.0  # the worker processes', summed
    database_cpu_seconds: float | None = None  # PostgreSQL's (postmaster and backends)
    worker_peak_rss_mib: float | None = None  # the largest worker's VmHWM at the end
    drain_seconds: float | None = None  # queue_first: workers released -> last task archived


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its VmRSS (Linux 4.0+, needs ptrace rights over it)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def _stop(process: Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGCONT)  # a held worker would leave SIGTERM pending
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _Service:
    """`python -m receiver serve` on a free loopback port, and its workers, logging to files."""

    def __init__(self, data_dir: Path, database_url: str, concurrency: int) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.concurrency = concurrency
        self.secret = secrets.token_urlsafe(24)
        self.admin_token = secrets.token_urlsafe(24)
        self.log_path = data_dir.parent / "service.log"
        self.process: Popen | None = None
        self.workers: list[Popen] = []
        self.base_url = ""

    def _environ(self, port: int, concurrency: int) -> dict[str, str]:
        # Nothing the service reads may come from the bench's own environment (a KLING_API_KEY
        # would turn polling and verification on, a STORAGE_URL send files elsewhere).
        own = {name.upper() for name in Settings.model_fields}
        inherited = {
            key: value
            for key, value in os.environ.items()
            if key.upper() not in own and not key.lower().endswith("_proxy")
        }
        path = os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)
        return inherited | {
            "PYTHONPATH": path,  # the checkout's code, run from the scratch directory
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATA_DIR": str(self.data_dir),
            "DATABASE_URL": self.database_url,
            "STORAGE_URL": str(self.data_dir / "assets"),
            "CALLBACK_SECRET": self.secret,
            "ADMIN_TOKEN": self.admin_token,
            "DOWNLOAD_CONCURRENCY": str(concurrency),
            "ALLOW_PRIVATE_DOWNLOADS": "true",
            "LOG_LEVEL": "INFO",
        }

    def _spawn(self, argv: list[str], env: dict[str, str], log_path: Path) -> tuple[Popen, int]:
        with open(log_path, "ab") as log:
            offset = log.tell()
            process = subprocess.Popen(
                [sys.executable, "-m", "receiver", *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir.parent,  # no .env of the checkout is read
            )
        return process, offset

    def start(self) -> None:
        for _ in range(3):  # another process may take the free port first
            port = _free_port()
            self.base_url = f"http://127.0.0.1:{port}"
            env = self._environ(port, self.concurrency)
            self.process, offset = self._spawn(["serve"], env, self.log_path)
            if self._wait_ready(offset):
                return
            _stop(self.process)
            self.process = None
            if "address already in use" not in self.log()[offset:].lower():
                raise BenchError(f"the service did not become ready:\n{self.log()[-2000:]}")
        raise BenchError("the service found no free port on 127.0.0.1 in three tries")

    def start_workers(self, count: int, concurrency: int) -> None:
        """`count` worker processes, each `--concurrency concurrency`, ready to claim."""
        env = self._environ(0, 0)
        started = []
        for number in range(count):
            log_path = self.data_dir.parent / f"worker-{number}.log"
            argv = ["worker", "--concurrency", str(concurrency)]
            process, offset = self._spawn(argv, env, log_path)
            self.workers.append(process)
            started.append((process, log_path, offset))
        deadline = time.monotonic() + 30
        for process, log_path, offset in started:
            while '"workers started"' not in log_path.read_text(errors="replace")[offset:]:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise BenchError(f"a worker did not start ({process.returncode}):\n{tail}")
                time.sleep(0.05)

    def _wait_ready(self, offset: int) -> bool:
        assert self.process is not None
        running = f"Uvicorn running on {self.base_url} "
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                answer = httpx.get(self.base_url + "/readyz", timeout=1, trust_env=False)
            except httpx.TransportError:
                answer = None
            if answer is not None and answer.status_code == 200 and running in self.log()[offset:]:
                return True
            time.sleep(0.05)
        return False

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> str | None:
        """None while the service and every worker run; else the log of the one that ended."""
        if self.process is None or self.process.poll() is not None:
            return self.log()
        for number, worker in enumerate(self.workers):
            if worker.poll() is not None:
                return (self.data_dir.parent / f"worker-{number}.log").read_text(errors="replace")
        return None

    def stop(self) -> None:
        for process in [*self.workers, self.process]:
            _stop(process)
        self.process = None
        self.workers = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def callback_path(self, task: Task) -> str:
        return tokens.callback_path(self.secret, tokens.task_ref(task.external_task_id), ACTION)


@dataclass(frozen=True, slots=True)
class _Delivered:
    wall_started: float  # time.time() as the first delivery went out
    seconds: float  # until the last answer
    latencies: list[float]


def _deliver(
    base_url: str, deliveries: Sequence[tuple[str, bytes]], connections: int, window: float
) -> _Delivered:
    """POST every (path, body); each must be answered 200 with the outcome `moved`."""
    sent = post_all(base_url, deliveries, connections, window)
    failures = list(sent.errors)
    for number, answer in enumerate(sent.answers):
        if answer is None:
            continue
        outcome = _outcome(answer)
        if answer.status != 200 or outcome != "moved":
            failures.append(f"delivery {number}: HTTP {answer.status} {answer.body[:200]!r}")
    if failures:
        shown = "\n".join(failures[:5])
        raise BenchError(f"{len(failures)} of {len(deliveries)} deliveries failed:\n{shown}")
    return _Delivered(sent.wall_started, sent.seconds, sent.latencies)


def _outcome(answer: Answer) -> object:
    try:
        data = answer.json()
    except ValueError:
        return None
    return data.get("outcome") if isinstance(data, dict) else None


def _archived(query: Reader) -> int:
    ((count,),) = query("SELECT count(*) FROM tasks WHERE archived_at IS NOT NULL")
    return int(count)


def _wait_archived(service: _Service, count: int, timeout: float) -> None:
    """Poll the ledger until `count` tasks are archived."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    with reading(service.database_url) as query:
        while True:
            done = _archived(query)
            now = time.monotonic()
            if done >= count:
                return
            if done != last:
                last, last_change = done, now
            ended = service.alive()
            if ended is not None:
                raise BenchError(f"a process exited during the burst:\n{ended[-2000:]}")
            if now > deadline or now - last_change > _STALL_SECONDS:
                raise BenchError(
                    f"{done} of {count} tasks archived after {timeout:.0f} s (or none for "
                    f"{_STALL_SECONDS:.0f} s); service log:\n{service.log()[-2000:]}"
                )
            time.sleep(0.2)


def _seconds_since(wall_started: float, iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() - wall_started


def _verify(database_url: str, root: Path, tasks: Sequence[Task]) -> tuple[str, int]:
    """Every task archived with its one asset stored as served; N files on disk, no leftovers.

    Returns the last archived_at and the download attempts over all assets.
    """
    expected = {task.task_id: task for task in tasks}
    root = root.resolve()  # as the sink records locations
    with reading(database_url) as query:
        rows = query(
            """SELECT tasks.task_id, tasks.archived_at, assets.state, assets.sha256, assets.size,
                      assets.attempts, assets.location
               FROM tasks LEFT JOIN assets ON assets.task_pk = tasks.id"""
        )
    problems: list[str] = []
    if len(rows) != len(expected) or {row[0] for row in rows} != set(expected):
        problems.append(f"the ledger holds {len(rows)} task/asset rows, not one per task")
    for task_id, archived_at, state, sha256, size, _attempts, location in rows:
        task = expected.get(task_id)
        if task is None:
            continue
        if archived_at is None or state != "stored":
            problems.append(f"{task_id}: archived_at {archived_at}, asset {state}")
        elif (sha256, size) != (task.asset.sha256, task.asset.size):
            problems.append(f"{task_id}: stored sha256 {sha256} size {size}, not as served")
        elif location != str(root / task.key):
            problems.append(f"{task_id}: stored at {location}, not {root / task.key}")
    stored, sidecars, other = 0, 0, []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            if name.startswith("."):
                other.append(os.path.join(folder, name))
            elif name.endswith(".json"):
                sidecars += 1
            else:
                stored += 1
    for task in tasks:
        path = root / task.key
        if not path.is_file() or path.stat().st_size != task.asset.size:
            problems.append(f"{path} is missing or not {task.asset.size} bytes")
            if len(problems) > 20:
                break
    if stored != len(tasks) or sidecars != len(tasks) or other:
        problems.append(
            f"{stored} files and {sidecars} sidecars stored for {len(tasks)} tasks, "
            f"{len(other)} leftovers ({', '.join(other[:3])})"
        )
    if problems:
        raise BenchError("the service did not archive every task:\n" + "\n".join(problems[:10]))
    return max(row[1] for row in rows), sum(row[5] for row in rows)


def run_service(
    scratch: Path,
    tasks: Sequence[Task],
    *,
    download_concurrency: int,
    connections: int,
    window: float,
    timeout: float,
    postgres: Postgres | None = None,
    workers: int = 0,
    queue_first: bool = False,
) -> ServiceRun:
    """Start a fresh service in `scratch`, burst every task's succeed callback at it, check it.

    Its ledger is SQLite in its data directory, or a new database on `postgres` (dropped at
    the end). With `workers`, the service downloads nothing and `workers` processes of
    `download_concurrency` downloads each do; with `queue_first`, only once every callback
    is answered.
    """
    data = scratch / "data"
    if postgres is None:
        database_url = sqlite_url(data.resolve() / "kling-receiver.db")
    else:
        database_url = postgres.create_database()
    service = _Service(data, database_url, 0 if workers else download_concurrency)
    try:
        service.start()
        if workers:
            service.start_workers(workers, download_concurrency)
        if queue_first:
            # Stopped while idle: they hold no lease, and their connections wait in the pool.
            for worker in service.workers:
                worker.send_signal(signal.SIGSTOP)
        now_ms = int(time.time() * 1000)
        deliveries = [(service.callback_path(task), task.body(now_ms)) for task in tasks]
        pids = [service.pid, *(worker.pid for worker in service.workers)]
        rss_before = status_kib("VmRSS", service.pid)
        reset = all([_reset_peak(pid) for pid in pids])
        cpu_before = [_cpu_seconds(pid) for pid in pids]
        database_before = postgres.cpu_seconds() if postgres is not None else 0.0
        delivered = _deliver(service.base_url, deliveries, connections, window)
        released = time.time()
        if queue_first:
            for worker in service.workers:
                worker.send_signal(signal.SIGCONT)
        _wait_archived(service, len(tasks), timeout)
        cpu = [_cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
        database_cpu = postgres.cpu_seconds() - database_before if postgres is not None else None
        peak = status_kib("VmHWM", service.pid)
        worker_peaks = [status_kib("VmHWM", worker.pid) for worker in service.workers]
        service.stop()
        last_archived, attempts = _verify(database_url, data / "assets", tasks)
    finally:
        service.stop()
        if postgres is not None:
            postgres.drop_database(database_url)
    latencies = sorted(delivered.latencies)
    log_lines = service.log().count("\n")
    return ServiceRun(
        archive_seconds=_seconds_since(delivered.wall_started, last_archived),
        deliver_seconds=delivered.seconds,
        latency_ms_median=statistics.median(latencies) * 1000,
        latency_ms_p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        rss_before_mib=rss_before / 1024,
        peak_rss_mib=peak / 1024,
        rss_growth_mib=(peak - rss_before) / 1024,
        peak_reset=reset,
        attempts=attempts,
        log_lines=log_lines,
        cpu_seconds=cpu[0],
        worker_cpu_seconds=sum(cpu[1:]),
        database_cpu_seconds=database_cpu,
        worker_peak_rss_mib=max(worker_peaks) / 1024 if worker_peaks else None,
        drain_seconds=_seconds_since(released, last_archived) if queue_first else None,
    )
