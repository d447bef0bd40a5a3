"""A real PostgreSQL for tests: Debian's server binaries, a throwaway cluster on loopback.

    with PostgresServer() as pg:
        psycopg.connect(pg.url)                 # postgresql://postgres@127.0.0.1:PORT/kling_test
        url = pg.create_database()              # a fresh empty database, for isolation
        with pg.stopped(mode="immediate"):      # a crash: no checkpoint, WAL replay on start
            ...                                 # the server is down here
        pg.restart()                            # or stop() ... start()

The binaries are the ones Debian's `postgresql` package installs under
/usr/lib/postgresql/<major>/bin (the newest major if several): never whatever `initdb` or
`pg_ctl` comes first on PATH. Without them, starting raises with the command that installs
them (`scripts/test` runs it when they are missing). `initdb` refuses to run as root, so as
root every server command runs as the `postgres` system user the package creates, through
`runuser -u postgres --`; anyone else runs them directly, as themselves.

The cluster lives in a new directory under the system temp directory (pytest's own temp
directory is closed to other users), owned by whoever runs the server: `data/` is the cluster,
`run/` its unix socket (kept out of /var/run/postgresql, the system cluster's), `server.log`
its log. pg_hba.conf lets anyone in without a password from 127.0.0.1 only, the server listens
on 127.0.0.1 only, on a free port that a restart keeps, and fsync and synchronous commit are
on: durability is what the tests using it check. Stopping removes the whole directory. The
server is a daemon (`pg_ctl start`): a test process killed with SIGKILL leaves it running, in
a `kling-pg-*` temp directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import psycopg
from psycopg import sql

from tests.support import free_port

DEBIAN_ROOT = Path("/usr/lib/postgresql")
INSTALL_COMMAND = (
    "apt-get install -y --no-install-recommends postgresql"
    " (scripts/test runs it when the server is missing)"
)
SYSTEM_USER = "postgres"
"""The unprivileged user Debian's package creates; the server runs as it when we are root."""
RUNUSER = ("/usr/sbin/runuser", "/sbin/runuser")
START_ATTEMPTS = 3
"""Start-up tries: a free port picked here can be taken by someone else before the server binds."""

StopMode = Literal["smart", "fast", "immediate"]


class PostgresError(RuntimeError):
    """PostgreSQL is not installed, or did not start or stop."""


def find_bindir(root: Path = DEBIAN_ROOT) -> Path:
    """The newest `<root>/<major>/bin` holding initdb, pg_ctl and postgres."""
    found = [
        path.parent
        for path in root.glob("*/bin/initdb")
        if all(os.access(path.parent / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres"))
    ]

    def major(bindir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))

    if not found:
        raise PostgresError(
            f"no PostgreSQL server binaries under {root}/*/bin: the tests start their own "
            f"server from Debian's package; install it with: {INSTALL_COMMAND}"
        )
    return max(found, key=major)


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with one database, `database`, made for tests."""

    def __init__(
        self,
        *,
        database: str = "kling_test",
        user: str = "postgres",
        settings: Mapping[str, str | int] | None = None,
        parent: Path | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.database = database
        self.user = user
        self.settings = dict(settings or {})
        self.parent = Path(parent or tempfile.gettempdir())
        self.timeout = timeout
        self.bindir: Path | None = None
        self.workdir: Path | None = None
        self.port: int | None = None
        self.running = False
        self.startup_seconds: float | None = None
        """Seconds the first start took: initdb, the server up, and the database created."""

    # -- paths and URLs ----------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._workdir / "data"

    @property
    def socket_dir(self) -> Path:
        return self._workdir / "run"

    @property
    def log_path(self) -> Path:
        return self._workdir / "server.log"

    @property
    def _workdir(self) -> Path:
        if self.workdir is None:
            raise PostgresError("PostgresServer is not started")
        return self.workdir

    def url_for(self, database: str) -> str:
        """`postgresql://user@127.0.0.1:PORT/database` (no password: trust on loopback)."""
        if self.port is None:
            raise PostgresError("PostgresServer is not started")
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The URL of `database`, the one made at start."""
        return self.url_for(self.database)

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def setup(self) -> None:
        """Make the cluster (initdb), start the server, and create `database`."""
        began = time.monotonic()
        self.bindir = find_bindir()
        owner = self._owner()
        self.workdir = Path(tempfile.mkdtemp(prefix="kling-pg-", dir=self.parent))
        if owner is not None:
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)
        self._server_command(["mkdir", "-m", "0700", str(self.socket_dir)])
        self._server_command(
            [
                str(self.bindir / "initdb"),
                f"--pgdata={self.data_dir}",
                f"--username={self.user}",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ]
        )
        self._write(
            "pg_hba.conf", "# TYPE DATABASE USER ADDRESS METHOD\nhost all all 127.0.0.1/32 trust\n"
        )
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            try:
                self.start()
                break
            except PostgresError:
                if attempt == START_ATTEMPTS or "could not bind" not in self.logs():
                    raise
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        self.startup_seconds = time.monotonic() - began

    def start(self) -> None:
        """Start the server (again) on its port and wait until it takes connections."""
        self._write("postgresql.auto.conf", self._config())
        command = [str(self._bin("pg_ctl")), "start", "--wait", f"--timeout={int(self.timeout)}"]
        command += [f"--pgdata={self.data_dir}", f"--log={self.log_path}", "--silent"]
        self._server_command(command)
        self.running = True

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server: "fast" rolls back sessions and checkpoints, "immediate" is a crash
        (no checkpoint: the next start replays the WAL), "smart" waits for sessions to end."""
        command = [str(self._bin("pg_ctl")), "stop", "--wait", f"--timeout={int(self.timeout)}"]
        command += [f"--pgdata={self.data_dir}", f"--mode={mode}", "--silent"]
        self._server_command(command)
        self.running = False

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop (in `mode`) and start again, on the same port and data."""
        self.stop(mode)
        self.start()

    @contextlib.contextmanager
    def stopped(self, mode: StopMode = "fast") -> Iterator[None]:
        """The server down for the body of a `with`, and up again after it, even on error."""
        self.stop(mode)
        try:
            yield
        finally:
            self.start()

    def teardown(self) -> None:
        """Stop the server if it runs (fast) and remove the cluster's directory."""
        try:
            if self.running or (
                self.workdir is not None and (self.data_dir / "postmaster.pid").exists()
            ):
                self.stop("fast")
        finally:
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None
            self.running = False

    # -- for tests ---------------------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """Create a database (a fresh uniquely named one by default) and return its URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def logs(self, lines: int = 40) -> str:
        """The last lines of the server's log, for failure messages."""
        if self.workdir is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.log_path} (last {len(tail)} lines)\n" + "\n".join(tail)

    # -- internals ---------------------------------------------------------------------

    def _config(self) -> str:
        settings: dict[str, str | int] = {
            "listen_addresses": "127.0.0.1",
            "port": self.port or 0,
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            **self.settings,
        }
        return "".join(f"{name} = '{value}'\n" for name, value in settings.items())

    def _bin(self, name: str) -> Path:
        if self.bindir is None:
            raise PostgresError("PostgresServer is not started")
        return self.bindir / name

    @staticmethod
    def _owner() -> pwd.struct_passwd | None:
        """The user the server runs as when that is not us (we are root), else None."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise PostgresError(
                f"running as root, and there is no `{SYSTEM_USER}` user to run the server as "
                f"(initdb refuses root); Debian's package creates it: {INSTALL_COMMAND}"
            ) from None

    def _server_command(self, argv: Sequence[str]) -> None:
        """Run `argv` as the server's user (through runuser when we are root); raise on failure."""
        if os.geteuid() == 0:
            runuser = next((path for path in RUNUSER if os.access(path, os.X_OK)), None)
            if runuser is None:
                raise PostgresError(f"running as root and no runuser in {RUNUSER} (util-linux)")
            argv = [runuser, "-u", SYSTEM_USER, "--", *argv]
        # No PG* variables from the caller (PGDATA, PGPORT, PGHOST... would redirect pg_ctl);
        # cwd in our directory, which the server's user can always enter.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", TZ="UTC")
        done = subprocess.run(
            argv,
            cwd=self._workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=self.timeout + 30,
            check=False,
        )
        if done.returncode != 0:
            raise PostgresError(
                f"{' '.join(argv)} exited with {done.returncode}\n"
                f"{done.stdout}{done.stderr}{self.logs()}"
            )

    def _write(self, name: str, text: str) -> None:
        """Write a file in the data directory, owned by the server's user, mode 0600."""
        path = self.data_dir / name
        path.write_text(text)
        path.chmod(0o600)
        owner = self._owner()
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)
