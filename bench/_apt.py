"""Debian tools the benchmarks drive (nginx, wrk), installed with apt-get when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

from bench._core import BenchError

__all__ = ["ensure_installed"]


def ensure_installed(name: str, packages: Sequence[str], which: Callable[[], str | None]) -> str:
    """The `name` binary that `which()` finds, after installing the first package that
    provides it when there is none (root on Debian only)."""
    found = which()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(
            f"{name} is not installed and cannot be installed from here "
            f"(run as root on Debian, or `apt-get install {packages[0]}` yourself)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"bench: installing {name} with apt-get", file=sys.stderr, flush=True)
    if subprocess.run(["apt-get", "update", "-qq"], env=env, check=False).returncode != 0:
        raise BenchError(f"apt-get update failed; cannot install {name}")
    for package in packages:
        done = subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, check=False)
        if done.returncode == 0 and (found := which()):
            return found
    raise BenchError(f"apt-get could not install any of {', '.join(packages)}")
