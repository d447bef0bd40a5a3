"""The burst's yardstick: `python -m bench._burst_fetch [--commit] [--threads N] LIST DIR`.

A plain downloader, in a fresh process: `--threads` threads (4, the
service's DOWNLOAD_CONCURRENCY) take lines `URL<TAB>KEY` from LIST and, like
the service, open one http.client connection per file, stream the body into
`DIR/KEY` and fsync it. No ledger, no hashing, no sidecar.

With `--commit` it stores each file as durably as the service's `LocalWriter`
does: into a hidden `.part` file that is fsynced and renamed into place, then a
JSON sidecar written the same way, then an fsync of the directory.

Prints one JSON object: seconds (first request to last fsync), files, bytes
and rss_growth_mib.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench._proc import reset_peak, status_kib

__all__ = ["main"]

_BUFFER = 1 << 20


def _get(url: str, target: Path, buffer: memoryview) -> int:
    """GET `url` on a fresh connection into `target` (fsynced); the bytes written."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", path, headers={"Accept-Encoding": "identity"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {response.status}")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        size = 0
        try:
            while count := response.readinto(buffer):
                view = buffer[:count]
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                size += count
            os.fsync(fd)
        finally:
            os.close(fd)
        return size
    finally:
        connection.close()


def _store(url: str, final: Path, buffer: memoryview, commit: bool) -> int:
    final.parent.mkdir(parents=True, exist_ok=True)
    if not commit:
        return _get(url, final, buffer)
    part = final.with_name(f".{final.name}.part")
    size = _get(url, part, buffer)
    os.replace(part, final)
    sidecar = final.with_name(f".{final.name}.json.tmp")
    with open(sidecar, "w") as out:
        json.dump({"source_url": url, "size": size}, out, indent=2, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    os.replace(sidecar, final.with_name(final.name + ".json"))
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._burst_fetch")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--commit", action="store_true", help="store as the service commits")
    parser.add_argument("list", type=Path, help="lines of URL<TAB>KEY")
    parser.add_argument("dir", type=Path)
    options = parser.parse_args(argv)

    jobs: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    count = 0
    for line in options.list.read_text().splitlines():
        url, key = line.split("\t")
        jobs.put((url, key))
        count += 1
    totals = [0] * options.threads
    errors: list[BaseException] = []

    def work(number: int) -> None:
        buffer = memoryview(bytearray(_BUFFER))
        try:
            while True:
                try:
                    url, key = jobs.get_nowait()
                except queue.Empty:
                    return
                totals[number] += _store(url, options.dir / key, buffer, options.commit)
        except BaseException as exc:  # reported below, after the other threads finish
            errors.append(exc)

    base_kib = reset_peak()
    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(n,)) for n in range(options.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        print(f"bench._burst_fetch: {errors[0]!r}", file=sys.stderr)
        return 1
    growth = (status_kib("VmHWM") - base_kib) / 1024
    result = {"seconds": seconds, "files": count, "bytes": sum(totals), "rss_growth_mib": growth}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
