"""The burst's subject: a real `kling-receiver serve` taking N succeed callbacks at once.

`run_service` starts the service on a free port of 127.0.0.1 with a fresh data
directory, delivers every callback (`bench._burst_send`: `connections` at a
time, as fast as they are answered or spread over `window` seconds), waits until the
ledger says every task is archived, reads the process's peak RSS, stops it and
checks what it stored: every task archived, one stored asset per task with
the source's sha256 and size, and exactly N files (plus their sidecars) on disk.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sqlite3
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
from bench._core import BenchError
from bench._proc import status_kib
from receiver import tokens
from receiver.settings import Settings

__all__ = ["Asset", "ServiceRun", "Task", "run_service"]

ACTION = "images/generations"
_ROOT = Path(__file__).resolve().parent.parent  # where `python -m receiver` finds its code
_STALL_SECONDS = 300.0  # no task archived for this long: the run is stuck


@dataclass(frozen=True, slots=True)
class Asset:
    """One served file: its URL path under nginx's root, size and sha256."""

    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Task:
    """One task of the burst and the one image its succeed callback names."""

    task_id: str
    external_task_id: str
    url: str
    asset: Asset

    @property
    def key(self) -> str:
        """Where the service stores the image: `action/task_id/index.ext`."""
        return f"{ACTION}/{self.task_id}/0.png"

    def body(self, now_ms: int) -> bytes:
        """The succeed callback Kling would send, as bytes."""
        data = {
            "task_id": self.task_id,
            "task_status": "succeed",
            "task_status_msg": "",
            "created_at": now_ms - 30_000,
            "updated_at": now_ms,
            "task_info": {"external_task_id": self.external_task_id},
            "task_result": {"images": [{"index": 0, "url": self.url}]},
        }
        return json.dumps(data).encode()


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


class _Service:
    """`python -m receiver serve` on a free loopback port, logging to a file."""

    def __init__(self, data_dir: Path, concurrency: int) -> None:
        self.data_dir = data_dir
        self.concurrency = concurrency
        self.secret = secrets.token_urlsafe(24)
        self.admin_token = secrets.token_urlsafe(24)
        self.log_path = data_dir.parent / "service.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def _environ(self, port: int) -> dict[str, str]:
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
            "STORAGE_URL": str(self.data_dir / "assets"),
            "CALLBACK_SECRET": self.secret,
            "ADMIN_TOKEN": self.admin_token,
            "DOWNLOAD_CONCURRENCY": str(self.concurrency),
            "ALLOW_PRIVATE_DOWNLOADS": "true",
            "LOG_LEVEL": "INFO",
        }

    def start(self) -> None:
        for _ in range(3):  # another process may take the free port first
            port = _free_port()
            self.base_url = f"http://127.0.0.1:{port}"
            with open(self.log_path, "ab") as log:
                offset = log.tell()
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "receiver", "serve"],
                    env=self._environ(port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir.parent,  # no .env of the checkout is read
                )
            if self._wait_ready(offset):
                return
            self.stop()
            if "address already in use" not in self.log()[offset:].lower():
                raise BenchError(f"the service did not become ready:\n{self.log()[-2000:]}")
        raise BenchError("the service found no free port on 127.0.0.1 in three tries")

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

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

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


def _read_only(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def _archived(db: Path) -> int:
    conn = _read_only(db)
    try:
        row = conn.execute("SELECT count(*) FROM tasks WHERE archived_at IS NOT NULL").fetchone()
        return int(row[0])
    finally:
        conn.close()


def _wait_archived(service: _Service, db: Path, count: int, timeout: float) -> None:
    """Poll the ledger (read-only) until `count` tasks are archived."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while True:
        done = _archived(db)
        now = time.monotonic()
        if done >= count:
            return
        if done != last:
            last, last_change = done, now
        if not service.alive():
            raise BenchError(f"the service exited during the burst:\n{service.log()[-2000:]}")
        if now > deadline or now - last_change > _STALL_SECONDS:
            raise BenchError(
                f"{done} of {count} tasks archived after {timeout:.0f} s (or none for "
                f"{_STALL_SECONDS:.0f} s); service log:\n{service.log()[-2000:]}"
            )
        time.sleep(0.2)


def _seconds_since(wall_started: float, iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() - wall_started


def _verify(db: Path, root: Path, tasks: Sequence[Task]) -> tuple[str, int]:
    """Every task archived with its one asset stored as served; N files on disk, no leftovers.

    Returns the last archived_at and the download attempts over all assets.
    """
    expected = {task.task_id: task for task in tasks}
    root = root.resolve()  # as the sink records locations
    conn = _read_only(db)
    try:
        rows = conn.execute(
            """SELECT tasks.task_id, tasks.archived_at, assets.state, assets.sha256, assets.size,
                      assets.attempts, assets.location
               FROM tasks LEFT JOIN assets ON assets.task_pk = tasks.id"""
        ).fetchall()
    finally:
        conn.close()
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
) -> ServiceRun:
    """Start a fresh service in `scratch`, burst every task's succeed callback at it, check it."""
    data = scratch / "data"
    service = _Service(data, download_concurrency)
    db = data / "kling-receiver.db"
    try:
        service.start()
        now_ms = int(time.time() * 1000)
        deliveries = [(service.callback_path(task), task.body(now_ms)) for task in tasks]
        rss_before = status_kib("VmRSS", service.pid)
        reset = _reset_peak(service.pid)
        delivered = _deliver(service.base_url, deliveries, connections, window)
        _wait_archived(service, db, len(tasks), timeout)
        peak = status_kib("VmHWM", service.pid)
        service.stop()
        last_archived, attempts = _verify(db, data / "assets", tasks)
    finally:
        service.stop()
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
    )
