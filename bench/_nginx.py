"""A throwaway nginx on 127.0.0.1, serving one directory, for the download benchmarks.

It is installed from Debian when missing (the bench runs as root on the
benchmark machines) and started in the foreground with its own config, pid,
logs and temp directories in a scratch directory, on a free port; nothing in
/etc/nginx is read or changed.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import _apt
from bench._core import BenchError

__all__ = ["Nginx", "ensure_installed", "serving"]

_PACKAGES = ("nginx-light", "nginx")  # nginx-light is gone from Debian 13; nginx is the fallback
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


@dataclass(frozen=True, slots=True)
class Nginx:
    """A running nginx: where it listens and what it is."""

    base_url: str
    version: str


def _which() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which("nginx", path=path)


def ensure_installed() -> str:
    """The nginx binary, installed with apt-get first when there is none."""
    return _apt.ensure_installed("nginx", _PACKAGES, _which)


def _build(binary: str) -> tuple[str, str]:
    """nginx's version, and its `-V` configure arguments."""
    done = subprocess.run([binary, "-V"], capture_output=True, text=True, check=True)
    text = done.stderr + done.stdout
    match = re.search(r"nginx/(\S+)", text)
    return (match.group(1) if match else "unknown"), text


def _config(scratch: Path, root: Path, port: int, build: str) -> str:
    lines = [
        "daemon off;",
        "worker_processes 1;",
        f"pid {scratch / 'nginx.pid'};",
        f"error_log {scratch / 'error.log'} warn;",
    ]
    if os.geteuid() == 0:
        # Workers run as whoever runs the bench, so they read the files it wrote.
        user = pwd.getpwuid(os.getuid()).pw_name
        lines.append(f"user {user} {grp.getgrgid(os.getgid()).gr_name};")
    lines += ["events { worker_connections 64; }", "http {"]
    for kind in _TEMP_PATHS:
        # Only modules that are built in know their directive; Debian's defaults live in
        # /var/lib/nginx, which may be missing or not ours.
        module = "http" if kind == "client_body" else f"http_{kind}"
        if f"--without-{module}_module" not in build:
            lines.append(f"    {kind}_temp_path {scratch / kind};")
    lines += [
        "    types { video/mp4 mp4; }",
        "    default_type application/octet-stream;",
        "    access_log off;",
        "    sendfile on;",
        "    tcp_nopush on;",
        "    server {",
        f"        listen 127.0.0.1:{port};",
        f"        root {root};",
        "        location / { }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_listening(process: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # SIGTERM: fast shutdown, master and workers
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def serving(root: Path) -> Iterator[Nginx]:
    """nginx serving `root` on 127.0.0.1 until the block ends."""
    binary = ensure_installed()
    version, build = _build(binary)
    with tempfile.TemporaryDirectory(prefix="kling-bench-nginx-") as name:
        scratch = Path(name)
        for kind in _TEMP_PATHS:
            (scratch / kind).mkdir()
        log = scratch / "error.log"
        for _ in range(3):  # another process may take the free port before nginx binds it
            port = _free_port()
            conf = scratch / "nginx.conf"
            conf.write_text(_config(scratch, root.resolve(), port, build))
            with open(scratch / "stderr.log", "wb") as stderr:
                process = subprocess.Popen(
                    [binary, "-p", str(scratch), "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            try:
                if _wait_listening(process, port, timeout=10.0):
                    yield Nginx(f"http://127.0.0.1:{port}", version)
                    return
            finally:
                _stop(process)
            errors = (scratch / "stderr.log").read_text(errors="replace")
            errors += log.read_text(errors="replace") if log.exists() else ""
            if "Address already in use" not in errors:
                raise BenchError(f"nginx did not start: {errors.strip() or 'no output'}")
        raise BenchError("nginx found no free port on 127.0.0.1 in three tries")
