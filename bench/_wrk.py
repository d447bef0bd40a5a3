"""wrk, the HTTP load generator, installed from Debian when missing and run with a Lua script.

The script given to `run` must print its results through `DONE_LUA`, which it
includes: a `done()` that writes one JSON line (requests, duration, latency
percentiles, socket errors, non-2xx answers and whatever the script's threads
report through `report_fields`) after wrk's own summary.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _apt
from bench._core import BenchError

__all__ = ["DONE_LUA", "Result", "ensure_installed", "run", "version"]

_MARK = "WRK_RESULT "

# Appended to a script: threads are kept as setup() sees them (setup also numbers them, as the
# global `thread_number`, 0-based, and sends thread n to the n-th of WRK_TARGETS, round robin,
# when `run` is given targets) and done() prints one JSON line. A thread's `report` global, a
# table of numbers, is read back per thread.
DONE_LUA = r"""
local _threads = {}
local _targets = {}
for target in (os.getenv("WRK_TARGETS") or ""):gmatch("[^,]+") do
  local host, port = target:match("^(.*):(%d+)$")
  table.insert(_targets, wrk.lookup(host, port)[1])
end

function setup(thread)
  if #_targets > 0 then
    thread.addr = _targets[#_threads % #_targets + 1]
  end
  thread:set("thread_number", #_threads)
  table.insert(_threads, thread)
end

function done(summary, latency, requests)
  local reported = {}
  for _, thread in ipairs(_threads) do
    local values = {}
    for _, name in ipairs(report_fields or {}) do
      table.insert(values, string.format("%q:%d", name, thread:get(name) or 0))
    end
    table.insert(reported, "{" .. table.concat(values, ",") .. "}")
  end
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
    "\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d," ..
    "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"p999_us\":%d,\"max_us\":%d,\"mean_us\":%.1f," ..
    "\"threads\":[%s]}\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean,
    table.concat(reported, ",")))
end
"""


@dataclass(frozen=True, slots=True)
class Result:
    """What one wrk run measured."""

    requests: int  # responses received, whatever their status
    seconds: float
    non_2xx: int  # answers with a status of 400 or more (wrk counts no others)
    socket_errors: int  # connect, read, write errors and timeouts
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    threads: tuple[dict[str, int], ...]  # each thread's `report_fields`
    cpu_seconds: float  # wrk's own user + system time

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx


def _which() -> str | None:
    return shutil.which("wrk")


def ensure_installed() -> str:
    """The wrk binary, installed with apt-get first when there is none."""
    return _apt.ensure_installed("wrk", ("wrk",), _which)


def version(binary: str) -> str:
    """wrk's version line, without the copyright."""
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout + done.stderr).strip().splitlines()
    return " ".join(first[0].split()[:2]) if first else "wrk (unknown version)"


def run(
    binary: str,
    url: str,
    script: Path,
    *,
    seconds: float,
    connections: int,
    threads: int,
    args: list[str] | None = None,
    timeout_seconds: float = 10.0,
    targets: Sequence[str] = (),
) -> Result:
    """Run wrk against `url` with `script` for `seconds`; its JSON line, parsed.

    With `targets` ("127.0.0.1:PORT", ...), thread n connects to targets[n % len(targets)]
    instead of `url`'s address (which still gives the Host header): one wrk, one latency
    histogram, the load split over several servers.
    """
    command = [
        binary,
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout_seconds))}s",
        f"--script={script}",
        url,
    ]
    if args:
        command += ["--", *args]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["WRK_TARGETS"] = ",".join(targets)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + 60:.0f} s") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if done.returncode != 0 or not lines:
        output = (done.stdout + done.stderr).strip()
        raise BenchError(f"wrk exited with {done.returncode}:\n{output or 'no output'}")
    raw: dict[str, Any] = json.loads(lines[-1].removeprefix(_MARK))
    if not raw["duration_us"]:
        raise BenchError("wrk reported a run of no duration")
    return Result(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        non_2xx=raw["status"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        p999_ms=raw["p999_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        mean_ms=raw["mean_us"] / 1000,
        threads=tuple(raw["threads"]),
        cpu_seconds=cpu,
    )
