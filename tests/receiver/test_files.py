"""keep_private: the umask it leaves and the modes it narrows (never widens)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver._files import keep_private
from tests.support import app_settings


@pytest.fixture(autouse=True)
def _umask_restored() -> Iterator[None]:
    """keep_private changes the process umask; the rest of the suite keeps its own."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_gains_077_and_keeps_what_it_had(tmp_path: Path) -> None:
    """A 022 umask becomes 077; a 027 one 077; a 277 one keeps its 200."""
    for start, expected in ((0o022, 0o077), (0o027, 0o077), (0o277, 0o277)):
        os.umask(start)
        keep_private(app_settings(tmp_path))
        assert os.umask(0o022) == expected


def test_old_files_are_narrowed_never_widened(tmp_path: Path) -> None:
    """0755/0644 become 0700/0600; a read-only file stays read-only; elsewhere is untouched."""
    settings = app_settings(tmp_path, database_url=f"sqlite:///{tmp_path}/db/l.db")
    data_dir = settings.data_dir
    data_dir.mkdir(mode=0o755)
    (tmp_path / "db").mkdir(mode=0o755)
    paths = {
        "secrets": data_dir / "secrets.json",
        "readonly": data_dir / "notes",
        "database": tmp_path / "db" / "l.db",
        "wal": tmp_path / "db" / "l.db-wal",
        "shm": tmp_path / "db" / "l.db-shm",
    }
    for path in paths.values():
        path.write_text("")
        path.chmod(0o644)
    paths["readonly"].chmod(0o444)
    keep_private(settings)
    assert mode(data_dir) == 0o700
    assert {name: mode(path) for name, path in paths.items()} == {
        "secrets": 0o600,
        "readonly": 0o400,
        "database": 0o600,
        "wal": 0o600,
        "shm": 0o600,
    }
    assert mode(tmp_path / "db") == 0o755  # the database's folder may be shared: not ours


def test_missing_files_and_other_databases_are_no_error(tmp_path: Path) -> None:
    """A first start (nothing there yet) and a DATABASE_URL that is not SQLite pass quietly."""
    keep_private(app_settings(tmp_path / "fresh", database_url="postgresql://db/x"))
    keep_private(app_settings(tmp_path / "fresh"))
