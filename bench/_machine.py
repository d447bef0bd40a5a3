"""Facts about the machine a run happened on, for the report's header."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["code_version", "filesystem", "load", "machine_facts"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except (OSError, ValueError, IndexError):
        pass
    return None


def filesystem(path: Path) -> str:
    """The device and type of the filesystem holding `path` (from /proc/self/mounts)."""
    target = path.resolve()
    best: tuple[int, str] = (-1, "unknown")
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return best[1]
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        device, point, kind = fields[0], fields[1].replace("\\040", " "), fields[2]
        if target.is_relative_to(point) and len(point) > best[0]:
            best = (len(point), f"{device} ({kind}) mounted on {point}")
    return best[1]


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def code_version() -> str:
    """The commit the code under test is at, and its files that differ from it."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        changed = _git("diff", "--name-only", "HEAD", "--", ":/storage", ":/receiver").split()
    except OSError:
        commit, changed = "", []
    if not commit:
        return "unknown (not a git checkout)"
    return f"{commit} + uncommitted {', '.join(changed)}" if changed else commit


def machine_facts() -> list[tuple[str, str]]:
    """nproc, CPU model, memory, kernel, Python and date, as label/value pairs."""
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = _memory_gib()
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("cpu", f"{nproc} available (nproc) of {os.cpu_count()}, {_cpu_model()}"),
        ("memory", "unknown" if memory is None else f"{memory:.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
    ]
