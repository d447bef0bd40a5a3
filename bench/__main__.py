"""`python -m bench [NAME ...]`: run every benchmark in `bench/`, or those named; print a table."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import shlex
import sys
import tempfile
from pathlib import Path
from typing import cast

import bench
from bench._core import BenchError, Benchmark, Report
from bench._machine import code_version, load, machine_facts
from bench._render import render


def discover() -> dict[str, Benchmark]:
    """The benchmark modules, by name: every module in `bench/` not starting with `_`."""
    found: dict[str, Benchmark] = {}
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            found[info.name] = cast(Benchmark, importlib.import_module(f"bench.{info.name}"))
    return found


def _command(argv: list[str]) -> str:
    python = sys.executable
    relative = os.path.relpath(python)
    if not relative.startswith(".."):
        python = relative
    return shlex.join([python, "-m", "bench", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    benchmarks = discover()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run kling-receiver's benchmarks and print absolute figures and ratios.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(benchmarks)})",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per subject (default 5)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the scratch directory goes; put it on the disk you want measured "
        "(default: %(default)s)",
    )
    for name, module in benchmarks.items():
        module.add_arguments(parser.add_argument_group(name))
    options = parser.parse_args(argv)
    unknown = [name for name in options.names if name not in benchmarks]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)} (have: {', '.join(benchmarks)})")
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")

    facts = [*machine_facts(), ("code", code_version())]
    load_before = load()
    reports: list[Report] = []
    selected = options.names or list(benchmarks)
    # Whatever any of them lacks (PostgreSQL) is said at once, not after the others ran.
    missing = []
    for name in selected:
        preflight = getattr(benchmarks[name], "preflight", None)
        try:
            if preflight is not None:
                preflight(options)
        except BenchError as exc:
            missing.append(f"bench: {name}: {exc}")
    if missing:
        print("\n".join(missing), file=sys.stderr)
        return 2
    try:
        for name in selected:
            print(f"bench: running {name}", file=sys.stderr, flush=True)
            reports.append(benchmarks[name].run(options))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    facts.append(("load", f"{load_before} before, {load()} after (1, 5, 15 min)"))
    print(render(facts, _command(argv), reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
