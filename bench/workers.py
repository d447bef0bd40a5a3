"""Workers: how the downloads scale with `kling-receiver worker` processes on one PostgreSQL.

The burst's setup (`bench._burst_tasks`: nginx on 127.0.0.1 serving small images, one
URL per task) with the ledger on PostgreSQL (`bench._postgres`, a fresh database each
run). Each run starts a `kling-receiver serve` that downloads nothing
(DOWNLOAD_CONCURRENCY=0) and k `kling-receiver worker --concurrency C` processes; then
every task's succeed callback is sent to the service and the run is timed from the first
callback to the last `archived_at` the ledger records. By default the workers are held
(SIGSTOP) until every callback is answered, then released together: the queue is full
when they start, and the drain (release to last `archived_at`) is timed apart, since on
a small machine taking the callbacks competes with the downloads for the same cores.
`--no-workers-queue-first` lets them work while the callbacks arrive. Every round
runs each k once (1, 2 and 4 by default, the first being the baseline the others are
divided by), in an order shuffled from round to round, and checks what was stored as
the burst does: every task archived, one asset each with the served sha256 and size,
nothing else on disk.

A module of its own rather than subjects of `bench.burst`: its yardstick is one worker,
not the plain downloader, and its question (does adding processes add throughput?)
needs neither the burst's 10 000 tasks nor its SQLite and plain-downloader runs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import _postgres
from bench._burst_service import ServiceRun, run_service
from bench._burst_tasks import ACTION, Task, make_tasks
from bench._core import BenchError, Report, Role, Row, paired_ratio, shuffled_rounds
from bench._machine import filesystem
from bench._nginx import serving
from bench._proc import fresh_dir

__all__ = ["add_arguments", "preflight", "run"]

_KIB = 1 << 10
_MIB = 1 << 20
_LEAVE_OUT = "run the other benchmarks by name (python -m bench burst download ingest s3)"


@dataclass(frozen=True, slots=True)
class _Subject:
    workers: int
    role: Role
    name: str


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError("each count must be a distinct positive number")
    return counts


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """--workers-counts, --workers-tasks and the shape of the queue."""
    group.add_argument(
        "--workers-counts",
        type=_counts,
        default=[1, 2, 4],
        metavar="K,K,...",
        help="worker processes per run; the first is the baseline (default 1,2,4)",
    )
    group.add_argument(
        "--workers-tasks",
        type=int,
        default=3000,
        help="tasks queued, one small image each (default 3000)",
    )
    group.add_argument(
        "--workers-concurrency",
        type=int,
        default=4,
        help="downloads at once in each worker (--concurrency; default 4, the burst's)",
    )
    group.add_argument(
        "--workers-files",
        type=int,
        default=256,
        help="distinct image files (20-100 KiB) the tasks' URLs point at (default 256)",
    )
    group.add_argument(
        "--workers-connections",
        type=int,
        default=64,
        help="connections delivering the callbacks (default 64)",
    )
    group.add_argument(
        "--workers-timeout",
        type=float,
        default=3600.0,
        help="seconds a run gets to archive every task (default 3600)",
    )
    group.add_argument(
        "--workers-seed", type=int, help="seed for sizes and subject order (default: random)"
    )
    group.add_argument(
        "--workers-queue-first",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hold the workers until every callback is answered, and time their drain apart "
        "(default: on; off: they download while the callbacks arrive)",
    )


def preflight(options: argparse.Namespace) -> None:
    """This benchmark is PostgreSQL's: fail before any runs when it is not installed."""
    _postgres.require(_LEAVE_OUT)


def run(options: argparse.Namespace) -> Report:
    """Queue the tasks through a receiver and time k workers draining them, round after round."""
    counts = options.workers_counts
    if options.workers_tasks < 1 or options.workers_files < 1 or options.workers_connections < 1:
        raise BenchError("--workers-tasks, --workers-files and --workers-connections must be >= 1")
    # nginx runs with 64 worker_connections; the downloads must not use them all up.
    if options.workers_concurrency < 1 or max(counts) * options.workers_concurrency > 32:
        raise BenchError("--workers-concurrency must be >= 1, with at most 32 downloads in all")
    bindir = _postgres.require(_LEAVE_OUT)
    seed = options.workers_seed if options.workers_seed is not None else random.randrange(1 << 16)
    subjects = [
        _Subject(
            count,
            Role.baseline if number == 0 else Role.subject,
            f"{count} x kling-receiver worker ({options.workers_concurrency} downloads each)",
        )
        for number, count in enumerate(counts)
    ]
    scratch = Path(tempfile.mkdtemp(prefix="kling-bench-workers-", dir=options.dir))
    try:
        www = scratch / "www"
        www.mkdir()
        with serving(www) as nginx, _postgres.serving(options.dir, bindir) as postgres:
            print(
                f"bench: workers: making {options.workers_tasks} tasks over "
                f"{options.workers_files} files",
                file=sys.stderr,
                flush=True,
            )
            rng = random.Random(seed)
            tasks = make_tasks(
                www, nginx.base_url, options.workers_tasks, rng, options.workers_files
            )
            samples = _measure(subjects, tasks, scratch, options, postgres, seed)
        disk = filesystem(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    facts = {"nginx": f"nginx {nginx.version} at {nginx.base_url}", "disk": disk}
    facts["postgres"] = postgres.version
    return _report(options, seed, subjects, samples, tasks, facts)


def _measure(
    subjects: list[_Subject],
    tasks: list[Task],
    scratch: Path,
    options: argparse.Namespace,
    postgres: _postgres.Postgres,
    seed: int,
) -> dict[int, list[ServiceRun]]:
    samples: dict[int, list[ServiceRun]] = {s.workers: [] for s in subjects}
    for number, subject in shuffled_rounds(subjects, options.rounds, seed):
        with fresh_dir(scratch / "run") as run_dir:
            done = run_service(
                run_dir,
                tasks,
                download_concurrency=options.workers_concurrency,
                connections=options.workers_connections,
                window=0.0,
                timeout=options.workers_timeout,
                postgres=postgres,
                workers=subject.workers,
                queue_first=options.workers_queue_first,
            )
        samples[subject.workers].append(done)
        drain = "" if done.drain_seconds is None else f", drained in {done.drain_seconds:.2f} s"
        print(
            f"bench: workers round {number}/{options.rounds}: {subject.name}: "
            f"{done.archive_seconds:.2f} s, {len(tasks) / done.archive_seconds:.1f} tasks/s "
            f"(callbacks answered in {done.deliver_seconds:.2f} s{drain}), "
            f"{done.attempts} attempts",
            file=sys.stderr,
            flush=True,
        )
    return samples


def _report(
    options: argparse.Namespace,
    seed: int,
    subjects: list[_Subject],
    samples: dict[int, list[ServiceRun]],
    tasks: list[Task],
    facts: dict[str, str],
) -> Report:
    count = len(tasks)
    first_runs = samples[subjects[0].workers]
    baseline = [count / s.archive_seconds for s in first_runs]
    drained = [count / s.drain_seconds for s in first_runs if s.drain_seconds]
    rows: list[Row] = []
    for subject in subjects:
        runs = samples[subject.workers]
        rates = [count / s.archive_seconds for s in runs]
        rows.append(
            Row(subject.name, subject.role, "tasks/s", tuple(rates), paired_ratio(rates, baseline))
        )
        if drained:
            drains = [count / s.drain_seconds for s in runs if s.drain_seconds]
            rows.append(
                Row(
                    "  the same runs, the drain alone: released -> last archived",
                    Role.reference,
                    "tasks/s",
                    tuple(drains),
                    paired_ratio(drains, drained),
                )
            )
        rows += [
            Row(
                "  the same runs, seconds",
                Role.reference,
                "s",
                tuple(s.archive_seconds for s in runs),
            ),
            Row(
                "  the same runs, seconds until every callback was answered",
                Role.reference,
                "s",
                tuple(s.deliver_seconds for s in runs),
            ),
            Row(
                "  the same runs, peak RSS of the largest worker (VmHWM)",
                Role.reference,
                "MiB",
                tuple(s.worker_peak_rss_mib or 0.0 for s in runs),
            ),
        ]
    sizes = [t.asset.size for t in tasks]
    first = subjects[0].workers
    setup = [
        f"tasks    {count} succeed callbacks ({ACTION}), one image each: "
        f"{min(options.workers_files, count)} distinct files of random bytes, "
        f"{min(sizes) / _KIB:.0f}-{max(sizes) / _KIB:.0f} KiB, {sum(sizes) / _MIB:.1f} MiB "
        "in all; one URL (hard link) per task",
        f"server   {facts['nginx']}/t/NNNNNN.png (sendfile on, access_log off)",
        "service  python -m receiver serve, DOWNLOAD_CONCURRENCY=0 (it downloads nothing), "
        "LOG_LEVEL=INFO, local storage",
        f"workers  k x python -m receiver worker --concurrency {options.workers_concurrency}, "
        "the same settings and storage, started before the first callback"
        + (
            "; held (SIGSTOP) until the last callback is answered, then released (SIGCONT)"
            if options.workers_queue_first
            else ", downloading while the callbacks arrive"
        ),
        f"postgres {facts['postgres']} at 127.0.0.1 (tests/pg_server.py: Debian's binaries), one "
        "server for the run, fsync and synchronous_commit on, settings otherwise default; a "
        "fresh database each run, dropped after it",
        f"sender   bench._burst_send in the bench process, {options.workers_connections} "
        "connections, as fast as the service answers",
        f"disk     scratch, sources, PostgreSQL's cluster and outputs on {facts['disk']}",
        f"rounds   {options.rounds}, subject order shuffled each round (--workers-seed {seed})",
        "between  outputs deleted, then sync; caches not dropped",
        f"ratio    median over rounds of (row tasks/s / {first} worker(s)' tasks/s in the same "
        "round)",
    ]
    if drained:
        setup.append(
            f"         the drain rows: / {first} worker(s)' drain in the same round, likewise"
        )
    notes = _notes(subjects, samples, count, options.workers_queue_first)
    return Report("workers", tuple(setup), tuple(rows), (), tuple(notes))


def _notes(
    subjects: list[_Subject], samples: dict[int, list[ServiceRun]], count: int, held: bool
) -> list[str]:
    def per_task_ms(values: list[float]) -> str:
        return f"{statistics.median(values) / count * 1e3:.2f}"

    cpu = []
    for subject in subjects:
        runs = samples[subject.workers]
        database = [s.database_cpu_seconds or 0.0 for s in runs]
        seconds = [s.archive_seconds for s in runs]
        busy = [
            (s.cpu_seconds + s.worker_cpu_seconds + (s.database_cpu_seconds or 0.0))
            / s.archive_seconds
            for s in runs
        ]
        cpu.append(
            f"{subject.workers}: receiver {per_task_ms([s.cpu_seconds for s in runs])}, workers "
            f"{per_task_ms([s.worker_cpu_seconds for s in runs])}, PostgreSQL "
            f"{per_task_ms(database)} ({statistics.median(busy):.2f} of the {os.cpu_count()} "
            f"cores busy with the three, over a median {statistics.median(seconds):.1f} s)"
        )
    attempts = ", ".join(str(s.attempts) for subject in subjects for s in samples[subject.workers])
    return [
        "the issue sets no goal: the figures are reported, not judged.",
        "seconds run from the first callback sent to the last archived_at the ledger records "
        "(millisecond times), so they include taking every callback"
        + (
            "; the drain runs from the workers' release, once the last callback was answered, "
            "to the same last archived_at. Released workers find the queue full at once."
            if held
            else "; the workers look for jobs every second while idle (the receiver cannot wake "
            "them), so a run may start up to a second late."
        )
        + " Process starts are not counted.",
        "CPU ms per task from the first callback to the last archive (medians), by worker "
        "count: " + "; ".join(cpu) + ".",
        f"checked each run: {count} tasks archived, one asset each stored with the served "
        f"sha256 and size, {count} files + {count} sidecars on disk and nothing else; download "
        f"attempts {attempts} (of {count} assets).",
        "the sender, nginx, the receiver, the workers and PostgreSQL all share the machine's CPUs.",
    ]
