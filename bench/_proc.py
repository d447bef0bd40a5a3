"""What the benchmarks read from /proc and write to disk more than once: memory and sources."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.media_server import STARTS

__all__ = ["fresh_dir", "make_source", "reset_peak", "status_kib"]

_MIB = 1 << 20


def status_kib(field: str, pid: int | str = "self") -> int:
    """A KiB figure (VmRSS, VmHWM…) from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int | str = "self") -> int:
    """Reset VmHWM to VmRSS where the kernel allows it; the KiB to measure growth from.

    Linux 4.0+, and for another process, ptrace rights over it. Where the reset is
    refused, growth is measured from the peak so far.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return status_kib("VmHWM", pid)
    return status_kib("VmRSS", pid)


def make_source(path: Path, size: int) -> str:
    """`size` bytes at `path`, an MP4's start then random ones (the service checks that a
    video starts like one), fsynced so their writeback lands in no measurement."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        start = STARTS["mp4"][:size]
        digest.update(start)
        out.write(start)
        remaining = size - len(start)
        while remaining:
            chunk = os.urandom(min(remaining, 16 * _MIB))
            digest.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


@contextmanager
def fresh_dir(path: Path) -> Iterator[Path]:
    """`path`, created empty for one run, then removed and synced, so that the next run
    starts with no writeback of this one pending."""
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path)
        os.sync()
