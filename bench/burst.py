"""Burst: N tasks reach `succeed` at once; how long until all are archived, and at what RSS.

nginx on 127.0.0.1 serves small images (random bytes, 20-100 KiB, a few
hundred distinct files behind one hard link per task, so every task has its
own URL). Each round runs every subject once, in an order shuffled from round
to round:

- the baseline: a plain downloader in a fresh process (`bench._burst_fetch`),
  as many threads as the service has download workers, one http.client
  connection per file as the service opens, each file written and fsynced;
- the service: a fresh `kling-receiver serve` with an empty data directory is
  sent every task's succeed callback over 64 keep-alive connections (a bare
  asyncio client, `bench._burst_send`; httpx could not keep up), as fast as it
  answers (or spread over `--burst-window` seconds), and timed from the first
  callback sent to the last `archived_at` the ledger records;
  its peak RSS is read from /proc at the end, and everything it stored is
  checked (every task archived, N files with the served bytes, no leftovers);
- unless `--no-burst-postgres`, the same service with its ledger on PostgreSQL
  (`bench._postgres`: one server for the run, a fresh database each run);
- for reference, the plain downloader storing each file as durably as the
  service's commit does (.part, fsync, rename, fsynced JSON sidecar, directory
  fsync): what is left of the gap is the ledger's and the callbacks' share.

Outputs are deleted and the disk synced between runs; the page cache is left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
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
_MINUTE = 60.0
_NO_POSTGRES = "--no-burst-postgres"
_COMMITTED = "plain downloader, stored as the service commits"
_ROOT = Path(__file__).resolve().parent.parent  # where `python -m bench._burst_fetch` runs


@dataclass(frozen=True, slots=True)
class _Sample:
    seconds: float
    tasks: int
    service: ServiceRun | None = None
    rss_growth_mib: float | None = None

    @property
    def per_second(self) -> float:
        return self.tasks / self.seconds


@dataclass(frozen=True, slots=True)
class _Subject:
    name: str
    role: Role
    unit: str
    measure: Callable[[Path], _Sample]


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """--burst-tasks and the shape of the burst."""
    group.add_argument(
        "--burst-tasks",
        type=int,
        default=10_000,
        help="tasks in the burst, one small image each (default 10000)",
    )
    group.add_argument(
        "--burst-files",
        type=int,
        default=256,
        help="distinct image files (20-100 KiB) the tasks' URLs point at (default 256)",
    )
    group.add_argument(
        "--burst-connections",
        type=int,
        default=64,
        help="connections delivering the callbacks (default 64)",
    )
    group.add_argument(
        "--burst-window",
        type=float,
        default=0.0,
        help="spread the deliveries evenly over this many seconds "
        "(default 0: as fast as the service answers)",
    )
    group.add_argument(
        "--burst-download-concurrency",
        type=int,
        default=4,
        help="the service's DOWNLOAD_CONCURRENCY, and the baseline's threads (default 4)",
    )
    group.add_argument(
        "--burst-timeout",
        type=float,
        default=3600.0,
        help="seconds the service gets to archive every task (default 3600)",
    )
    group.add_argument(
        "--burst-seed", type=int, help="seed for sizes and subject order (default: random)"
    )
    group.add_argument(
        "--burst-no-reference",
        action="store_true",
        help="skip the plain downloader with the service's commit",
    )
    group.add_argument(
        "--burst-postgres",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the service with its ledger on PostgreSQL (default: on; needs Debian's "
        "postgresql server binaries)",
    )


def preflight(options: argparse.Namespace) -> None:
    """Fail before any benchmark runs when PostgreSQL is wanted and not installed."""
    if options.burst_postgres:
        _postgres.require(f"pass {_NO_POSTGRES}")


def _no_proxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def _plain(tasks: list[Task], threads: int, commit: bool) -> Callable[[Path], _Sample]:
    def measure(scratch: Path) -> _Sample:
        listing = scratch / "urls.tsv"
        listing.write_text("".join(f"{t.url}\t{t.key}\n" for t in tasks))
        out = scratch / "out"
        command = [sys.executable, "-m", "bench._burst_fetch", "--threads", str(threads)]
        command += ["--commit"] if commit else []
        done = subprocess.run(
            [*command, str(listing), str(out)],
            capture_output=True,
            text=True,
            env=_no_proxy_env(),
            cwd=_ROOT,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"bench._burst_fetch failed:\n{done.stderr.strip()[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        _check_plain(out, tasks, commit)
        return _Sample(result["seconds"], len(tasks), rss_growth_mib=result["rss_growth_mib"])

    return measure


def _check_plain(out: Path, tasks: list[Task], commit: bool) -> None:
    """The plain downloader's files are all there, each as large as served."""
    for task in tasks:
        path = out / task.key
        if not path.is_file() or path.stat().st_size != task.asset.size:
            raise BenchError(f"the plain downloader left {path} missing or of the wrong size")
        if commit and not path.with_name(path.name + ".json").is_file():
            raise BenchError(f"the plain downloader left no sidecar beside {path}")


def _service(
    tasks: list[Task], options: argparse.Namespace, postgres: _postgres.Postgres | None = None
) -> Callable[[Path], _Sample]:
    def measure(scratch: Path) -> _Sample:
        done = run_service(
            scratch,
            tasks,
            download_concurrency=options.burst_download_concurrency,
            connections=options.burst_connections,
            window=options.burst_window,
            timeout=options.burst_timeout,
            postgres=postgres,
        )
        return _Sample(done.archive_seconds, len(tasks), done, done.rss_growth_mib)

    return measure


def _subjects(
    tasks: list[Task], options: argparse.Namespace, postgres: _postgres.Postgres | None
) -> list[_Subject]:
    threads = options.burst_download_concurrency
    subjects = [
        _Subject(
            f"plain downloader: http.client, {threads} threads, write + fsync",
            Role.baseline,
            "files/s",
            _plain(tasks, threads, commit=False),
        ),
        _Subject(
            f"service: {len(tasks)} succeed callbacks -> all archived",
            Role.subject,
            "tasks/s",
            _service(tasks, options),
        ),
    ]
    if postgres is not None:
        subjects.append(
            _Subject(
                f"service on PostgreSQL: {len(tasks)} succeed callbacks -> all archived",
                Role.subject,
                "tasks/s",
                _service(tasks, options, postgres),
            )
        )
    if not options.burst_no_reference:
        subjects.append(
            _Subject(
                _COMMITTED,
                Role.reference,
                "files/s",
                _plain(tasks, threads, commit=True),
            )
        )
    return subjects


def _describe(sample: _Sample) -> str:
    text = f"{sample.seconds:.2f} s, {sample.per_second:.1f}/s"
    if sample.service is not None:
        run = sample.service
        text += (
            f" (callbacks answered in {run.deliver_seconds:.2f} s), peak RSS "
            f"{run.peak_rss_mib:.1f} MiB (+{run.rss_growth_mib:.1f}), {run.attempts} attempts"
        )
    return text


def _measure(
    subjects: list[_Subject], scratch: Path, rounds: int, seed: int
) -> dict[str, list[_Sample]]:
    samples: dict[str, list[_Sample]] = {s.name: [] for s in subjects}
    for number, subject in shuffled_rounds(subjects, rounds, seed):
        with fresh_dir(scratch / "run") as run_dir:
            sample = subject.measure(run_dir)
        samples[subject.name].append(sample)
        print(
            f"bench: burst round {number}/{rounds}: {subject.name}: {_describe(sample)}",
            file=sys.stderr,
            flush=True,
        )
    return samples


def run(options: argparse.Namespace) -> Report:
    """Serve small images with nginx; burst their tasks at the service and at the yardsticks."""
    if options.burst_tasks < 1 or options.burst_files < 1:
        raise BenchError("--burst-tasks and --burst-files must be positive")
    # nginx runs with 64 worker_connections; the downloads must not use them all up.
    if options.burst_connections < 1 or not 1 <= options.burst_download_concurrency <= 32:
        raise BenchError("--burst-connections must be positive, --burst-download-concurrency 1-32")
    bindir = _postgres.require(f"pass {_NO_POSTGRES}") if options.burst_postgres else None
    seed = options.burst_seed if options.burst_seed is not None else random.randrange(1 << 16)
    scratch = Path(tempfile.mkdtemp(prefix="kling-bench-burst-", dir=options.dir))
    postgres = None
    try:
        www = scratch / "www"
        www.mkdir()
        with serving(www) as nginx, ExitStack() as stack:
            if bindir is not None:
                postgres = stack.enter_context(_postgres.serving(options.dir, bindir))
            print(
                f"bench: burst: making {options.burst_tasks} tasks over "
                f"{options.burst_files} files",
                file=sys.stderr,
                flush=True,
            )
            tasks = make_tasks(
                www, nginx.base_url, options.burst_tasks, random.Random(seed), options.burst_files
            )
            subjects = _subjects(tasks, options, postgres)
            samples = _measure(subjects, scratch, options.rounds, seed)
        disk = filesystem(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    database = postgres.version if postgres is not None else None
    return _report(
        options, seed, subjects, samples, tasks, (nginx.version, nginx.base_url), disk, database
    )


def _report(
    options: argparse.Namespace,
    seed: int,
    subjects: list[_Subject],
    samples: dict[str, list[_Sample]],
    tasks: list[Task],
    nginx: tuple[str, str],
    disk: str,
    database: str | None,
) -> Report:
    baseline_subject = next(s for s in subjects if s.role is Role.baseline)
    baseline = [s.per_second for s in samples[baseline_subject.name]]
    committed = [s.per_second for s in samples.get(_COMMITTED, [])]
    rows: list[Row] = []
    for subject in subjects:
        runs = samples[subject.name]
        rates = [s.per_second for s in runs]
        growths = [s.rss_growth_mib for s in runs if s.rss_growth_mib is not None]
        rows.append(
            Row(
                subject.name,
                subject.role,
                subject.unit,
                tuple(rates),
                paired_ratio(rates, baseline),
                max(growths) if growths else None,
            )
        )
        services = [s.service for s in runs if s.service is not None]
        if services and committed:
            # Each subject runs once a round, so the n-th samples of two subjects share a round.
            rows.append(
                Row(
                    f"  / {_COMMITTED}, same round",
                    Role.reference,
                    "x",
                    tuple(r / c for r, c in zip(rates, committed, strict=True)),
                )
            )
        rows.append(
            Row("  the same runs, seconds", Role.reference, "s", tuple(s.seconds for s in runs))
        )
        if services:
            rows.append(
                Row(
                    "  the same runs, seconds until every callback was answered",
                    Role.reference,
                    "s",
                    tuple(s.deliver_seconds for s in services),
                )
            )
            rows.append(
                Row(
                    "  the same runs, peak RSS of the service (VmHWM)",
                    Role.reference,
                    "MiB",
                    tuple(s.peak_rss_mib for s in services),
                )
            )
    sizes = [t.asset.size for t in tasks]
    files = options.burst_files
    pace = (
        "as fast as the service answers"
        if not options.burst_window
        else f"spread evenly over {options.burst_window:g} s"
    )
    setup = [
        f"tasks    {len(tasks)} succeed callbacks ({ACTION}), one image each: "
        f"{min(files, len(tasks))} distinct files of random bytes, "
        f"{min(sizes) / _KIB:.0f}-{max(sizes) / _KIB:.0f} KiB, "
        f"{sum(sizes) / _MIB:.1f} MiB in all; one URL (hard link) per task",
        f"server   nginx {nginx[0]} at {nginx[1]}/t/NNNNNN.png (sendfile on, access_log off)",
        f"service  python -m receiver serve, DOWNLOAD_CONCURRENCY="
        f"{options.burst_download_concurrency}, LOG_LEVEL=INFO, local storage, fresh data "
        "directory each round, its SQLite ledger in it",
    ]
    if database is not None:
        setup.append(
            f"postgres the same with DATABASE_URL on {database} at 127.0.0.1 (tests/pg_server.py:"
            " Debian's binaries), one server for the run, fsync and synchronous_commit on,"
            " settings otherwise default; a fresh database each round, dropped after it"
        )
    setup += [
        f"sender   bench._burst_send (asyncio streams, HTTP/1.1 keep-alive) in the bench "
        f"process, {options.burst_connections} connections, {pace}",
        f"disk     scratch, sources, ledger{', PostgreSQL cluster' if database else ''} and "
        f"outputs on {disk}",
        f"rounds   {options.rounds}, subject order shuffled each round (--burst-seed {seed})",
        "between  outputs deleted, then sync; caches not dropped",
        "ratio    median over rounds of (row files or tasks per s / baseline files per s in the "
        "same round) = baseline seconds / row seconds",
    ]
    if committed:
        setup.append(
            f"         '/ {_COMMITTED}' rows: per round, the service's tasks/s / that "
            "reference's files/s in the same round; median in the median column"
        )
    notes = [
        "the issue sets no goal for the burst: the figures are reported, not judged.",
        "service seconds run from the first callback sent to the last archived_at the ledger "
        "records (millisecond times), so they include taking every callback; the plain "
        "downloader's run from its first request to its last fsync. Neither counts its process "
        "start.",
    ]
    for subject in subjects:
        services = [s.service for s in samples[subject.name] if s.service is not None]
        if services:
            label = "on PostgreSQL" if "PostgreSQL" in subject.name else "on SQLite"
            notes += _notes(label, services, len(tasks), options)
    notes.append(
        "the sender and nginx share the machine's CPUs with the service during its runs; the "
        "plain downloader runs alone."
    )
    return Report("burst", tuple(setup), tuple(rows), (), tuple(notes))


def _notes(
    label: str, services: list[ServiceRun], count: int, options: argparse.Namespace
) -> list[str]:
    deliver = statistics.median(s.deliver_seconds for s in services)
    before = statistics.median(s.rss_before_mib for s in services)
    slowest = max(s.deliver_seconds for s in services)
    cpu = statistics.median(s.cpu_seconds for s in services)
    database = [s.database_cpu_seconds for s in services if s.database_cpu_seconds is not None]
    notes = [
        f"{label}, callbacks: {count} answered in a median {deliver:.2f} s "
        f"({count / deliver:.0f}/s, slowest round {slowest:.2f} s), latency median "
        f"{statistics.median(s.latency_ms_median for s in services):.1f} ms, p99 "
        f"{statistics.median(s.latency_ms_p99 for s in services):.1f} ms (medians over rounds)"
        + (
            "; slower than the minute the issue gives the burst."
            if slowest > _MINUTE and not options.burst_window
            else "."
        ),
        f"{label}, CPU from the first callback to the last archive (medians): the service "
        f"{cpu:.1f} s ({cpu / count * 1e3:.2f} ms a task)"
        + (
            f", PostgreSQL {statistics.median(database):.1f} s "
            f"({statistics.median(database) / count * 1e3:.2f} ms a task)."
            if database
            else "."
        ),
        f"{label}, peak RSS: the service's VmHWM when every task is archived; growth is that "
        f"minus its VmRSS once ready, before the burst (median {before:.1f} MiB)"
        + (
            ", VmHWM having been reset to VmRSS then (clear_refs)."
            if all(s.peak_reset for s in services)
            else "; VmHWM could not be reset, so start-up's peak may be counted."
        ),
        f"{label}, checked each round: {count} tasks archived, one asset each stored with the "
        f"served sha256 and size, {count} files + {count} sidecars on disk and nothing else; "
        f"download attempts {', '.join(str(s.attempts) for s in services)} (of {count} assets).",
    ]
    return notes
