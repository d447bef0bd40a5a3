"""Compare the running environment with a lock file written by `scripts/lock`.

    python scripts/locked.py requirements/test.txt [--sync]

Prints each locked package that is missing or installed at another version, and each
installed package the lock does not list; exits 1 if there is any. With --sync the
unlisted ones are uninstalled first (as pip-sync does), so a reused .venv matches the
lock exactly. Needs `packaging`, which the test lock carries.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

# Not in any lock: the installer, and the project itself (installed from the checkout).
UNLOCKED = frozenset({"pip", "kling-receiver"})

_PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;]+)\s*(?:;\s*(.+))?$")


def pins(text: str) -> dict[str, str]:
    """The packages a lock file installs on this interpreter, by canonical name."""
    found: dict[str, str] = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s--hash=\S+", "", line.split("#", 1)[0]).strip()
        if not line:
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"not a pinned requirement: {line!r}")
        name, version, marker = match.groups()
        if marker is None or Marker(marker).evaluate():
            found[canonicalize_name(name)] = version
    return found


def installed() -> dict[str, str]:
    """Every distribution in this environment, by canonical name."""
    return {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
    }


def differences(locked: dict[str, str], present: dict[str, str]) -> list[str]:
    """Sentences naming every way `present` differs from `locked`; empty when they agree."""
    found = []
    for name, version in sorted(locked.items()):
        if name not in present:
            found.append(f"{name}=={version} is locked but not installed")
        elif present[name] != version:
            found.append(f"{name} is {present[name]}, the lock says {version}")
    found += [
        f"{name} {version} is installed but not locked"
        for name, version in sorted(present.items())
        if name not in locked and name not in UNLOCKED
    ]
    return found


def _uninstall(names: Iterable[str]) -> None:
    command = [sys.executable, "-m", "pip", "uninstall", "-y", "-q", *names]
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--sync", action="store_true", help="uninstall what the lock lacks")
    options = parser.parse_args(argv)
    locked = pins(options.lock.read_text())
    if options.sync:
        extra = [name for name in installed() if name not in locked and name not in UNLOCKED]
        if extra:
            _uninstall(extra)
    problems = differences(locked, installed())
    for problem in problems:
        print(f"{options.lock}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
