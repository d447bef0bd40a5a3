"""One download in a fresh process: `python -m bench._fetch_one [--via httpx] URL DIR`.

`--via service` (the default) is the service's own path, as
`Downloader._download` runs it: `storage.fetch` in a worker thread into a
`LocalSink` writer, then commit (fsync, rename, sidecar, directory fsync).
`--via httpx` is a reference: httpx async streaming, hashlib and aiofiles.

Prints one JSON object: seconds, fetch_seconds, commit_seconds, bytes,
sha256, path and rss_growth_mib, the rise of the process's peak RSS over its
RSS once everything is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench._proc import reset_peak, status_kib
from storage import LocalSink, UrlPolicy, extension, fetch

__all__ = ["Outcome", "main"]

_STEM = "bench/video"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one download took and produced."""

    seconds: float
    fetch_seconds: float
    commit_seconds: float
    bytes: int
    sha256: str
    path: str
    rss_growth_mib: float


def _service(url: str, root: Path) -> tuple[float, float, int, str, str]:
    writer = LocalSink(root).open(_STEM)
    try:
        started = time.perf_counter()
        fetched = fetch(
            url,
            writer,
            policy=UrlPolicy(allow_private=True),
            cancel=threading.Event(),
            expect="video",
        )
        fetched_at = time.perf_counter()
        key = _STEM + extension(fetched.content_type, fetched.final_url)
        sidecar = {"source_url": url, "sha256": fetched.sha256, "size": fetched.size}
        location = writer.commit(key, sidecar)
        committed_at = time.perf_counter()
    except BaseException:
        writer.discard()
        raise
    return (
        fetched_at - started,
        committed_at - fetched_at,
        fetched.size,
        fetched.sha256,
        location,
    )


async def _httpx(url: str, root: Path) -> tuple[float, float, int, str, str]:
    import aiofiles
    import httpx

    final = root / "video.mp4"
    part = root / ".video.mp4.part"
    digest = hashlib.sha256()
    size = 0
    started = time.perf_counter()
    async with (
        httpx.AsyncClient(trust_env=False, timeout=60.0) as client,
        client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response,
        aiofiles.open(part, "wb") as out,
    ):
        response.raise_for_status()
        async for chunk in response.aiter_raw(1 << 20):
            digest.update(chunk)
            await out.write(chunk)
            size += len(chunk)
        fetched_at = time.perf_counter()
        await out.flush()
        await asyncio.to_thread(os.fsync, out.fileno())
    os.replace(part, final)
    committed_at = time.perf_counter()
    return fetched_at - started, committed_at - fetched_at, size, digest.hexdigest(), str(final)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._fetch_one")
    parser.add_argument("--via", choices=["service", "httpx"], default="service")
    parser.add_argument("url")
    parser.add_argument("dir", type=Path)
    options = parser.parse_args(argv)
    if options.via == "httpx":
        import aiofiles  # noqa: F401  (imported before the RSS baseline, like storage is)
        import httpx  # noqa: F401

    base_kib = reset_peak()
    started = time.perf_counter()
    if options.via == "service":
        # As Downloader.process runs it: the blocking path in a worker thread.
        done = asyncio.run(_in_thread(options.url, options.dir))
    else:
        done = asyncio.run(_httpx(options.url, options.dir))
    seconds = time.perf_counter() - started
    growth = (status_kib("VmHWM") - base_kib) / 1024
    fetch_seconds, commit_seconds, size, sha256, path = done
    outcome = Outcome(seconds, fetch_seconds, commit_seconds, size, sha256, path, growth)
    json.dump(asdict(outcome), sys.stdout)
    sys.stdout.write("\n")
    return 0


async def _in_thread(url: str, root: Path) -> tuple[float, float, int, str, str]:
    return await asyncio.to_thread(_service, url, root)


if __name__ == "__main__":
    sys.exit(main())
