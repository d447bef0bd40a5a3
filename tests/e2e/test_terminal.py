"""`kling-receiver serve` started by a person in a terminal: a banner and readable lines."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import free_port

pytestmark = pytest.mark.e2e


def on_terminal(data_dir: Path, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    """`serve` with a pseudo-terminal as its stdout and stderr; returns it and the pty."""
    main, child = pty.openpty()
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KLING_", "EVENT_", "ADMIN_", "CALLBACK_", "LOG_", "NO_COLOR"))
    }
    environ |= {"DATA_DIR": str(data_dir), "PORT": str(free_port()), "TERM": "xterm"} | env
    process = subprocess.Popen(
        [sys.executable, "-m", "receiver", "serve"],
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env=environ,
        cwd=data_dir.parent,
    )
    os.close(child)
    return process, main


def read_until(fd: int, done: Callable[[str], bool], seconds: float = 30) -> str:
    seen = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done(seen.decode(errors="replace")):
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the process closed the terminal
                break
    return seen.decode(errors="replace")


def stop(process: subprocess.Popen[bytes], fd: int) -> str:
    process.send_signal(signal.SIGTERM)
    rest = read_until(fd, lambda text: "Finished server process" in text, 30)
    assert process.wait(30) == 0
    os.close(fd)
    return rest


def test_a_terminal_gets_a_banner_and_readable_lines(tmp_path: Path) -> None:
    """The banner names where the service listens, its secrets and its storage; log lines
    are text with colour, not JSON."""
    process, fd = on_terminal(tmp_path / "data")
    try:
        shown = read_until(fd, lambda text: "Ctrl-C stops it" in text)
        assert "kling-receiver is listening on http://127.0.0.1:" in shown, shown
        assert "dashboard  http://127.0.0.1:" in shown
        secrets = (tmp_path / "data" / "secrets.json").resolve()
        assert f"secrets    {secrets} (generated here:" in shown
        assert f"storage    {(tmp_path / 'data' / 'assets').as_posix()}" in shown
        assert "/callbacks/kling/" in shown and "/api/events/stream" in shown
        assert "\x1b[32mINFO" in shown  # coloured levels
        assert not [line for line in shown.splitlines() if line.startswith("{")]
    finally:
        tail = stop(process, fd)
    assert " stopped" in tail


def test_log_format_json_keeps_json_on_a_terminal(tmp_path: Path) -> None:
    """LOG_FORMAT=json: the same JSON lines as under a process manager, and no banner."""
    process, fd = on_terminal(tmp_path / "data", LOG_FORMAT="json")
    try:
        shown = read_until(fd, lambda text: '"message": "Uvicorn running' in text)
    finally:
        stop(process, fd)
    lines = [line for line in shown.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["time"] for line in lines)
    assert "kling-receiver is listening" not in shown
