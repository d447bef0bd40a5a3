"""Helpers shared by the suite: fixture payloads, free ports, and the real service process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from receiver import tokens
from receiver.settings import Settings, load_settings

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kling"
CALLBACK_SECRET = "test-callback-secret-0123456789abcdef"
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
# base64 of "test-event-webhook-secret-0123456": a Standard Webhooks key.
EVENT_WEBHOOK_SECRET = "whsec_dGVzdC1ldmVudC13ZWJob29rLXNlY3JldC0wMTIzNDU2"
KLING_API_KEY = "test-kling-api-key-0123456789"


def fixture_bytes(name: str) -> bytes:
    """A sample payload from tests/fixtures/kling, as the bytes Kling would send."""
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(fixture_bytes(name))
    return data


def app_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for an in-process app: its data under tmp_path, download workers off, the
    test secrets, no `.env`; `overrides` (settings by field name) win."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "download_concurrency": 0,
        "callback_secret": CALLBACK_SECRET,
        "admin_token": ADMIN_TOKEN,
        "event_webhook_secret": EVENT_WEBHOOK_SECRET,
    }
    return load_settings(_env_file=None, **(values | overrides))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """`kling-receiver serve` as a real process on a free loopback port."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        *,
        secrets_in_env: bool = True,
        rlimits: dict[int, int] | None = None,
    ) -> None:
        """With `secrets_in_env=False` the service generates its secrets (`GENERATED_SECRETS`).

        `rlimits` ({resource.RLIMIT_FSIZE: bytes, ...}) are set in `serve` before it starts;
        change the attribute between `stop()` and `start()` to start it with other limits.
        """
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"service-{self.port}.log"
        self.extra_env = env or {}
        self.secrets_in_env = secrets_in_env
        self.rlimits = dict(rlimits or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def secrets_path(self) -> Path:
        return self.data_dir / "secrets.json"

    @property
    def callback_secret(self) -> str:
        return CALLBACK_SECRET if self.secrets_in_env else self._stored_secret("callback_secret")

    @property
    def admin_token(self) -> str:
        return ADMIN_TOKEN if self.secrets_in_env else self._stored_secret("admin_token")

    def _stored_secret(self, name: str) -> str:
        value: str = json.loads(self.secrets_path.read_text())[name]
        return value

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def callback_url(self, ref: str | None = None, action: str | None = None) -> str:
        path = tokens.callback_path(self.callback_secret, ref or tokens.new_channel_ref(), action)
        return self.base_url + path

    def environ(self) -> dict[str, str]:
        """The environment the service's processes run with."""
        inherited = {
            key: value
            for key, value in os.environ.items()
            if not key.endswith("_PROXY")
            and key not in ("CALLBACK_SECRET", "ADMIN_TOKEN", "EVENT_WEBHOOK_SECRET")
        }
        env = inherited | {
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATA_DIR": str(self.data_dir),
            "LOG_LEVEL": "INFO",
            "DOWNLOAD_CONCURRENCY": "0",  # tests that download turn workers on themselves
        }
        if self.secrets_in_env:
            env |= {
                "CALLBACK_SECRET": CALLBACK_SECRET,
                "ADMIN_TOKEN": ADMIN_TOKEN,
                "EVENT_WEBHOOK_SECRET": EVENT_WEBHOOK_SECRET,
            }
        return env | self.extra_env

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run `python -m receiver ARGS` with the service's environment and working directory."""
        return subprocess.run(
            [sys.executable, "-m", "receiver", *args],
            env=self.environ(),
            cwd=self.data_dir.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, ready: bool = True) -> None:
        """Start `serve` and wait until it answers /readyz (or only /healthz, if not `ready`)."""
        probe = "/readyz" if ready else "/healthz"
        log = open(self.log_path, "ab")
        log_start = log.tell()
        self.process = subprocess.Popen(
            self._limited([sys.executable, "-m", "receiver", "serve"]),
            env=self.environ(),
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
                answer = httpx.get(self.base_url + probe, timeout=1, trust_env=False)
            except httpx.TransportError:
                answer = None
            if answer is not None and answer.status_code == 200 and self._bound_since(log_start):
                return
            time.sleep(0.05)
        raise RuntimeError(f"service did not become ready:\n{self.log()}")

    def _limited(self, command: list[str]) -> list[str]:
        """`command`, run under `rlimits` if any: a small Python sets them, then execs it.

        (Not a `preexec_fn`: that runs Python between fork and exec, unsafe in this threaded
        test process.) The exec keeps the pid, so `stop()` signals the service itself.
        """
        if not self.rlimits:
            return command
        limits = ", ".join(f"({resource:d}, {limit:d})" for resource, limit in self.rlimits.items())
        setup = (
            "import os, resource, sys\n"
            f"for resource_, limit in [{limits}]:\n"
            "    resource.setrlimit(resource_, (limit, limit))\n"
            "os.execv(sys.argv[1], sys.argv[1:])\n"
        )
        return [sys.executable, "-c", setup, *command]

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        """Start `python -m receiver worker ARGS` on the service's database and storage.

        It is kept in `workers` (logs in `worker_log_path(n)`); `kill_all()` ends it.
        """
        log_path = self.worker_log_path(len(self.workers))
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "receiver", "worker", *args],
                env=self.environ(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir.parent,
            )
        self.workers.append(process)
        return process

    def worker_log_path(self, number: int) -> Path:
        return self.data_dir.parent / f"worker-{self.port}-{number}.log"

    def kill_all(self) -> None:
        """SIGKILL the service and its workers, whichever still run."""
        for process in [self.process, *self.workers]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        self.process = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def restart(self, ready: bool = True) -> None:
        self.stop(signal.SIGKILL)
        self.start(ready)

    def _bound_since(self, offset: int) -> bool:
        """Whether this process (not another that took the free port first) is listening."""
        if self.environ().get("LOG_LEVEL", "").upper() not in ("DEBUG", "INFO"):
            return True  # uvicorn's "running on" line is not logged: trust /readyz
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return f"Uvicorn running on {self.base_url} ".encode() in log.read()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_entries(self) -> list[dict[str, Any]]:
        return json_lines(self.log())

    def api(self, path: str, **params: Any) -> httpx.Response:
        """GET an admin API path of this service."""
        return httpx.get(self.base_url + path, params=params, headers=self.admin, trust_env=False)

    def submit(self, action: str, params: dict[str, Any]) -> str:
        """POST /api/tasks; the new task's id."""
        response = httpx.post(
            self.base_url + "/api/tasks",
            json={"action": action, "params": params},
            headers=self.admin,
            trust_env=False,
        )
        assert response.status_code == 201, response.text
        task_id: str = response.json()["task_id"]
        return task_id

    def task(self, task_id: str) -> dict[str, Any]:
        """The task's JSON from the API; it must exist."""
        response = self.api(f"/api/tasks/{task_id}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    def archived(self, task_id: str) -> Callable[[], bool]:
        """A check for `wait_for`: the task is recorded, and archived."""

        def check() -> bool:
            response = self.api(f"/api/tasks/{task_id}")
            if response.status_code == 404:
                return False
            assert response.status_code == 200, response.text
            return bool(response.json()["archived"])

        return check


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a log, one a line; other lines are skipped."""
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def kling_env(base_url: str) -> dict[str, str]:
    """Settings for a service that calls a fake Kling at `base_url` and downloads from
    loopback, with every poll and retry wait shrunk to fractions of a second."""
    return {
        "KLING_API_BASE": base_url,
        "KLING_API_KEY": KLING_API_KEY,
        "ALLOW_PRIVATE_DOWNLOADS": "true",
        "DOWNLOAD_RETRY_BASE_SECONDS": "0.05",
        "POLL_INTERVAL": "0.2",
        "POLL_MAX_INTERVAL": "1",
        "POLL_TICK_SECONDS": "0.1",
        "KLING_RETRY_BASE_SECONDS": "0.01",
    }


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def post_all(deliveries: list[tuple[str, bytes]], concurrency: int = 64) -> list[httpx.Response]:
    """POST every (url, body) at once, at most `concurrency` in flight; responses in order."""

    async def run() -> list[httpx.Response]:
        gate = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:

            async def one(url: str, content: bytes) -> httpx.Response:
                async with gate:
                    return await client.post(
                        url, content=content, headers={"Content-Type": "application/json"}
                    )

            return await asyncio.gather(*(one(url, content) for url, content in deliveries))

    return asyncio.run(run())


def assert_error(response: Any, status_code: int, code: str, *words: str) -> None:
    """The response is a JSON error with this code and a sentence that mentions `words`."""
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == code
    message = body["message"]
    assert message.endswith(".") and len(message.split()) >= 5, message
    for word in words:
        assert word in message, message


def succeed_payload(task_id: str, urls: list[str], action: str) -> dict[str, Any]:
    """A succeed callback for `task_id` naming these URLs: images for images/…, else videos."""
    if action.startswith("images/"):
        data = fixture_json("callback_images_generations_succeed.json")
        data["task_result"] = {"images": [{"index": n, "url": u} for n, u in enumerate(urls)]}
    else:
        data = fixture_json("callback_text2video_succeed.json")
        data["task_result"] = {
            "videos": [{"id": f"{task_id}_{n}", "url": u} for n, u in enumerate(urls)]
        }
    data["task_id"] = task_id
    return data
