"""Download throughput: nginx on loopback to local disk, the service's path against curl.

The source is a file of random bytes served by nginx on 127.0.0.1. Each round
runs every subject once, in an order shuffled from round to round: `curl -s -o
FILE URL` (the baseline), the service's path (`storage.fetch` into
`LocalSink`, commit included, in a fresh process that reports its own peak
RSS growth) and, for comparison only, curl followed by an fsync (durable as
the service's commit is) and httpx + aiofiles when they are installed. Every
output is checked against the source's sha256, then deleted and the disk
synced before the next run; the page cache is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench._core import BenchError, Goal, Report, Role, Row, paired_ratio, shuffled_rounds
from bench._machine import filesystem
from bench._nginx import serving
from bench._proc import fresh_dir, make_source

__all__ = ["add_arguments", "run"]

_MIB = 1 << 20
_RATIO_GOAL = 0.6
_RSS_GOAL_MIB = 64.0
_CURL = "curl -s -o FILE URL"
_ROOT = Path(__file__).resolve().parent.parent  # where `python -m bench._fetch_one` finds its code


@dataclass(frozen=True, slots=True)
class _Sample:
    seconds: float
    size: int
    rss_growth_mib: float | None = None
    fetch_seconds: float | None = None
    wall_seconds: float | None = None
    reported_sha256: str | None = None  # what the subject itself said it hashed

    @property
    def mib_s(self) -> float:
        return self.size / _MIB / self.seconds


@dataclass(frozen=True, slots=True)
class _Subject:
    name: str
    role: Role
    measure: Callable[[str, Path], _Sample]


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """--size-mib, and whether to run the httpx reference."""
    group.add_argument(
        "--size-mib", type=int, default=1024, help="size of the served file (default 1024)"
    )
    group.add_argument(
        "--seed", type=int, help="seed for the order of subjects in each round (default: random)"
    )
    group.add_argument(
        "--no-httpx", action="store_true", help="skip the httpx + aiofiles reference"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as held:
        while chunk := held.read(4 * _MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _no_proxy_env() -> dict[str, str]:
    """The environment without proxy settings: every byte stays on loopback."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def _curl(url: str, out: Path, *, durable: bool) -> _Sample:
    target = out / "video.mp4"
    started = time.perf_counter()
    done = subprocess.run(["curl", "-s", "-o", str(target), url], env=_no_proxy_env(), check=False)
    if durable and done.returncode == 0:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"curl exited with {done.returncode} for {url}")
    return _Sample(seconds, target.stat().st_size)


def _fetch_one(url: str, out: Path, via: str) -> _Sample:
    command = [sys.executable, "-m", "bench._fetch_one", "--via", via, url, str(out)]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env=_no_proxy_env(), cwd=_ROOT, check=False
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"bench._fetch_one --via {via} failed:\n{done.stderr.strip()}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    path = Path(result["path"])
    if path.stat().st_size != result["bytes"]:
        raise BenchError(f"{path} holds {path.stat().st_size} bytes, not {result['bytes']}")
    return _Sample(
        seconds=result["seconds"],
        size=result["bytes"],
        rss_growth_mib=result["rss_growth_mib"],
        fetch_seconds=result["fetch_seconds"],
        wall_seconds=wall,
        reported_sha256=result["sha256"],
    )


def _output(out: Path) -> Path:
    found = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".json")]
    if len(found) != 1:
        raise BenchError(f"expected one downloaded file in {out}, found {found}")
    return found[0]


def _subjects(with_httpx: bool) -> list[_Subject]:
    subjects = [
        _Subject(_CURL, Role.baseline, lambda url, out: _curl(url, out, durable=False)),
        _Subject(
            "service: storage.fetch -> LocalSink + commit",
            Role.subject,
            lambda url, out: _fetch_one(url, out, "service"),
        ),
        _Subject(
            "curl -s -o FILE URL, then fsync(FILE)",
            Role.reference,
            lambda url, out: _curl(url, out, durable=True),
        ),
    ]
    if with_httpx:
        subjects.append(
            _Subject(
                "httpx stream + hashlib + aiofiles, fsync",
                Role.reference,
                lambda url, out: _fetch_one(url, out, "httpx"),
            )
        )
    return subjects


def _measure(
    subjects: list[_Subject], url: str, scratch: Path, source_sha256: str, rounds: int, seed: int
) -> dict[str, list[_Sample]]:
    samples: dict[str, list[_Sample]] = {s.name: [] for s in subjects}
    for number, subject in shuffled_rounds(subjects, rounds, seed):
        with fresh_dir(scratch / "out") as out:
            sample = subject.measure(url, out)
            stored = _sha256(_output(out))
            for what, got in (("stored", stored), ("reported", sample.reported_sha256)):
                if got not in (None, source_sha256):
                    raise BenchError(f"{subject.name}: {what} sha256 {got} != {source_sha256}")
        samples[subject.name].append(sample)
        rss = "" if sample.rss_growth_mib is None else f", RSS +{sample.rss_growth_mib:.1f} MiB"
        print(
            f"bench: download round {number}/{rounds}: {subject.name}: "
            f"{sample.mib_s:.1f} MiB/s{rss}",
            file=sys.stderr,
            flush=True,
        )
    return samples


def _tool_version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError:
        return "missing"
    first = (done.stdout + done.stderr).strip().splitlines()[0]
    return " ".join(first.split()[:2])  # "curl 7.88.1", without the library list


def run(options: argparse.Namespace) -> Report:
    """Serve a random file with nginx and download it with each subject, round after round."""
    size = options.size_mib * _MIB
    if size <= 0:
        raise BenchError("--size-mib must be positive")
    if shutil.which("curl") is None:
        raise BenchError("curl is not installed (apt-get install curl)")
    with_httpx = not options.no_httpx and all(
        importlib.util.find_spec(name) is not None for name in ("httpx", "aiofiles")
    )
    seed = options.seed if options.seed is not None else random.randrange(1 << 16)
    scratch = Path(tempfile.mkdtemp(prefix="kling-bench-download-", dir=options.dir))
    try:
        www = scratch / "www"
        www.mkdir()
        source = www / "video.mp4"
        print(f"bench: writing {options.size_mib} MiB of random bytes", file=sys.stderr)
        source_sha256 = make_source(source, size)
        subjects = _subjects(with_httpx)
        with serving(www) as nginx:
            url = f"{nginx.base_url}/video.mp4"
            samples = _measure(subjects, url, scratch, source_sha256, options.rounds, seed)
        disk = filesystem(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _report(options, seed, subjects, samples, nginx.version, url, disk, source_sha256)


def _report(
    options: argparse.Namespace,
    seed: int,
    subjects: list[_Subject],
    samples: dict[str, list[_Sample]],
    nginx_version: str,
    url: str,
    disk: str,
    source_sha256: str,
) -> Report:
    baseline = [s.mib_s for s in samples[_CURL]]
    rows: list[Row] = []
    for subject in subjects:
        mib_s = [s.mib_s for s in samples[subject.name]]
        growths = [s.rss_growth_mib for s in samples[subject.name] if s.rss_growth_mib is not None]
        rows.append(
            Row(
                subject.name,
                subject.role,
                "MiB/s",
                tuple(mib_s),
                paired_ratio(mib_s, baseline),
                max(growths) if growths else None,
            )
        )
        if subject.role is Role.subject:
            service = samples[subject.name]
            fetch_only = [s.size / _MIB / (s.fetch_seconds or s.seconds) for s in service]
            rows.append(
                Row(
                    "  the same runs, fetch only (before commit)",
                    Role.reference,
                    "MiB/s",
                    tuple(fetch_only),
                    paired_ratio(fetch_only, baseline),
                )
            )
    service_row = next(r for r in rows if r.role is Role.subject)
    durable_row = next(r for r in rows if r.subject.endswith("fsync(FILE)"))
    service = samples[service_row.subject]
    ratio = paired_ratio(service_row.samples, baseline)
    rss_growth = max(s.rss_growth_mib or 0.0 for s in service)
    size_note = "" if options.size_mib == 1024 else f" (at {options.size_mib} MiB, not 1024)"
    goals = (
        Goal(
            f"service / curl >= {_RATIO_GOAL:.2f}, sha256 on",
            f"{ratio:.2f}",
            ratio >= _RATIO_GOAL,
        ),
        Goal(
            f"peak RSS growth < {_RSS_GOAL_MIB:.0f} MiB storing the file{size_note}",
            f"{rss_growth:.1f} MiB",
            rss_growth < _RSS_GOAL_MIB,
        ),
    )
    setup = (
        f"source   {options.size_mib} MiB of random bytes, sha256 {source_sha256[:16]}...",
        f"server   nginx {nginx_version} at {url} (sendfile on, access_log off)",
        f"client   {_tool_version(['curl', '--version'])}",
        f"disk     scratch, source and outputs on {disk}",
        f"rounds   {options.rounds}, subject order shuffled each round (--seed {seed})",
        "between  each output checked (sha256), deleted, then sync; caches not dropped",
        f"ratio    median over rounds of (row MiB/s / {_CURL} MiB/s in the same round)",
    )
    walls = [s.wall_seconds for s in service if s.wall_seconds]
    notes = [
        "service seconds are timed inside its process, from the request to the end of commit"
        " (fsync, rename, sidecar, directory fsync); the process start and imports are not"
        f" counted (with them: median {statistics.median(walls):.2f} s). curl's include its start.",
        "peak RSS growth: VmHWM after the download minus VmRSS before it (VmHWM reset through"
        " /proc/self/clear_refs), worst round.",
        f"{durable_row.subject} is the baseline made as durable as the service's commit;"
        f" service / that = {paired_ratio(service_row.samples, durable_row.samples):.2f}"
        " (median of per-round ratios).",
    ]
    if "tmpfs" in disk:
        notes.append("the scratch directory is on tmpfs: no disk was measured; pass --dir")
    return Report("download", setup, tuple(rows), goals, tuple(notes))
