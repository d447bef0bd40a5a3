"""One upload in a fresh process: `python -m bench._s3_upload --via sink|obstore ... FILE KEY`.

`--via sink` is the service's path: `S3Sink.open(stem)`, `begin`, the file read
1 MiB at a time into the buffer `writer.buffer()` lends (as `storage.fetch`
reads the socket), each chunk hashed (sha256) and handed to `writer.write` as a
memoryview in the same thread, then `commit` (the multipart upload completed, the sha256 set by
a copy onto itself, the sidecar PUT). The object is `STEM.mp4`.

`--via obstore` is the library alone: one `obstore.put` of the same bytes to
KEY, from the file's path (`--source path`, obstore reads it) or from an
iterator of 1 MiB `bytes` read from it (`--source iter`), with `--chunk-size`
and `--concurrency` (obstore's defaults when omitted). No hashing.

`--via sink --no-hash` skips the sha256 (the sidecar gets BENCH_S3_SHA256
instead): a diagnosis of what hashing costs, not the service's path.

The endpoint, bucket and credentials come from BENCH_S3_ENDPOINT,
BENCH_S3_BUCKET, BENCH_S3_ACCESS_KEY and BENCH_S3_SECRET_KEY. Prints one JSON
object: seconds (from open(), or from the put, to the end), bytes, cpu_seconds
(the process's user + system time over the same span), sha256 (sink only),
rss_growth_mib (peak RSS over the RSS once everything is imported and the store
is built) and, for the sink, where its time went.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import obstore
from obstore.store import S3Store

from bench._proc import reset_peak, status_kib
from storage import S3Options, open_sink
from storage.fetch import READ_SIZE
from storage.s3 import S3Sink

__all__ = ["Outcome", "main"]

_T = TypeVar("_T")


@dataclass(slots=True)
class Outcome:
    """What one upload took."""

    seconds: float
    bytes: int
    rss_growth_mib: float
    cpu_seconds: float = 0.0  # user + system, the whole process, during the upload
    sha256: str | None = None
    location: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # sink only: seconds per phase


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"{name} is not set")
    return value


def _timed(phases: dict[str, float], name: str, call: Callable[..., _T]) -> Callable[..., _T]:
    """`call`, adding the seconds each call takes to `phases[name]` (thread-safe enough: one
    caller per name)."""

    def wrapper(*args: Any, **kwargs: Any) -> _T:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - started

    return wrapper


def _sink(source: Path, stem: str, options: S3Options, bucket: str, hashing: bool) -> Outcome:
    sink = open_sink(f"s3://{bucket}", options)
    assert isinstance(sink, S3Sink)
    phases: dict[str, float] = {}
    # Instance attributes shadow the methods: the sink's own code, timed from outside.
    sink.stored = _timed(phases, "lookup", sink.stored)  # type: ignore[method-assign]
    sink.upload = _timed(phases, "upload", sink.upload)  # type: ignore[method-assign]
    sink.set_metadata = _timed(phases, "metadata", sink.set_metadata)  # type: ignore[method-assign]
    sink.put = _timed(phases, "sidecar", sink.put)  # type: ignore[method-assign]
    read = hashed = writing = 0.0
    size = 0
    with open(source, "rb", buffering=0) as held:
        base_kib = reset_peak()
        cpu = _cpu()
        started = time.perf_counter()
        writer = sink.open(stem)
        try:
            writer.begin("video/mp4", "http://bench.invalid/video.mp4", source.stat().st_size)
            digest = writer.hasher()
            while True:
                t0 = time.perf_counter()
                buffer = writer.buffer()
                count = held.readinto(buffer)
                t1 = time.perf_counter()
                if not count:
                    break
                chunk = buffer[:count]
                if hashing:
                    digest.update(chunk)
                t2 = time.perf_counter()
                writer.write(chunk)
                t3 = time.perf_counter()
                read += t1 - t0
                hashed += t2 - t1
                writing += t3 - t2
                size += count
            written = time.perf_counter()
            sha256 = digest.hexdigest() if hashing else _env("BENCH_S3_SHA256")
            location = writer.commit(stem + ".mp4", {"sha256": sha256, "size": size})
        except BaseException:
            writer.discard()
            raise
        finished = time.perf_counter()
        cpu = _cpu() - cpu
    growth = (status_kib("VmHWM") - base_kib) / 1024
    phases.update(read=read, sha256=hashed, write=writing, commit=finished - written)
    phases["writes_end"] = written - started
    return Outcome(finished - started, size, growth, cpu, sha256, location, phases)


def _chunks(source: Path) -> Iterator[bytes]:
    with open(source, "rb", buffering=0) as held:
        while chunk := held.read(READ_SIZE):
            yield chunk


def _obstore(
    source: Path, key: str, how: str, chunk_size: int | None, concurrency: int | None, bucket: str
) -> Outcome:
    store = S3Store(
        bucket,
        config={
            "endpoint": _env("BENCH_S3_ENDPOINT"),
            "access_key_id": _env("BENCH_S3_ACCESS_KEY"),
            "secret_access_key": _env("BENCH_S3_SECRET_KEY"),
            "region": "us-east-1",
            "virtual_hosted_style_request": False,
        },
        client_options={"allow_http": True},
    )
    shape: dict[str, int] = {}
    if chunk_size is not None:
        shape["chunk_size"] = chunk_size
    if concurrency is not None:
        shape["max_concurrency"] = concurrency
    base_kib = reset_peak()
    cpu = _cpu()
    started = time.perf_counter()
    if how == "path":
        obstore.put(store, key, source, **shape)  # type: ignore[arg-type]
    else:
        obstore.put(store, key, _chunks(source), **shape)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    cpu = _cpu() - cpu
    growth = (status_kib("VmHWM") - base_kib) / 1024
    return Outcome(seconds, source.stat().st_size, growth, cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._s3_upload")
    parser.add_argument("--via", choices=["sink", "obstore"], default="sink")
    parser.add_argument("--source", choices=["path", "iter"], default="path")
    parser.add_argument("--chunk-size", type=int, help="bytes per part (sink: part_size)")
    parser.add_argument("--concurrency", type=int, help="parts in flight")
    parser.add_argument(
        "--no-hash",
        action="store_true",
        help="sink: skip sha256 (a diagnosis, not the service's path; needs BENCH_S3_SHA256)",
    )
    parser.add_argument("file", type=Path)
    parser.add_argument("key", help="the object's key (sink: its stem; .mp4 is added)")
    options = parser.parse_args(argv)
    bucket = _env("BENCH_S3_BUCKET")
    if options.via == "sink":
        shape: dict[str, int] = {}  # the service's defaults unless told
        if options.chunk_size is not None:
            shape["part_size"] = options.chunk_size
        if options.concurrency is not None:
            shape["upload_concurrency"] = options.concurrency
        s3 = S3Options(
            _env("BENCH_S3_ACCESS_KEY"),
            _env("BENCH_S3_SECRET_KEY"),
            endpoint_url=_env("BENCH_S3_ENDPOINT"),
            path_style=True,
            allow_http=True,
            **shape,
        )
        outcome = _sink(options.file, options.key, s3, bucket, not options.no_hash)
    else:
        outcome = _obstore(
            options.file,
            options.key,
            options.source,
            options.chunk_size,
            options.concurrency,
            bucket,
        )
    json.dump(asdict(outcome), sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
