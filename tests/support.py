"""Helpers shared by the suite: fixture payloads, free ports, and the real service process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from receiver import tokens

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "kling"
CALLBACK_SECRET = "test-callback-secret-0123456789abcdef"
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


def fixture_bytes(name: str) -> bytes:
    """A sample payload from shared/fixtures/kling, as the bytes Kling would send."""
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(fixture_bytes(name))
    return data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """`kling-receiver serve` as a real process on a free loopback port."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"service-{self.port}.log"
        self.extra_env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def callback_url(self, ref: str | None = None, action: str | None = None) -> str:
        path = tokens.callback_path(CALLBACK_SECRET, ref or tokens.new_channel_ref(), action)
        return self.base_url + path

    def start(self) -> None:
        env = {key: value for key, value in os.environ.items() if not key.endswith("_PROXY")} | {
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATA_DIR": str(self.data_dir),
            "CALLBACK_SECRET": CALLBACK_SECRET,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "LOG_LEVEL": "INFO",
            **self.extra_env,
        }
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "receiver", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir.parent,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"service did not become ready:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def restart(self) -> None:
        self.stop(signal.SIGKILL)
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries
