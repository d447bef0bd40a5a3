"""The service's files are for its own user only: the data directory 0700, files 0600.

The database holds every callback and the secrets file the keys, so no other local
user may read them. `keep_private` runs once at the start of every command, before
anything is opened: it narrows the process umask, so that everything created from
then on (the database, downloads and their sidecars, directories) is private,
and narrows the modes of what an earlier start already left behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from receiver.database import sqlite_path
from receiver.ledger import LedgerUnavailable
from receiver.settings import Settings

__all__ = ["keep_private"]

# Bits no one but the owner gets; added to whatever umask the process was started with.
_OTHERS = 0o077
# SQLite's companions of a database file; it gives new ones the database's own mode.
_SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def keep_private(settings: Settings) -> None:
    """Narrow the umask, then the modes of the data directory, database and secrets."""
    umask = _narrow_umask()
    _narrow(settings.data_dir, 0o700, umask)
    for name in os.listdir(settings.data_dir) if settings.data_dir.is_dir() else ():
        path = settings.data_dir / name
        if path.is_file() and not path.is_symlink():
            _narrow(path, 0o600, umask)  # the secrets file, its lock, a database kept here
    try:
        database = sqlite_path(settings.database_url)
    except LedgerUnavailable:
        return  # a DATABASE_URL that is not SQLite is refused when the ledger opens
    # SQLite creates the -wal and -shm files with the database file's mode, not the umask.
    for path in (database, *(Path(f"{database}{suffix}") for suffix in _SQLITE_SIDECARS)):
        _narrow(path, 0o600, umask)


def _narrow_umask() -> int:
    """Add `_OTHERS` to the process umask; the umask now in force."""
    umask = os.umask(_OTHERS) | _OTHERS
    os.umask(umask)
    return umask


def _narrow(path: Path, mode: int, umask: int) -> None:
    """Take from `path` every permission outside `mode` and the umask; never add one."""
    # A file that is missing, or not ours to change, is left as it is: what this process
    # creates is private through the umask in any case.
    with contextlib.suppress(OSError):
        current = path.stat().st_mode & 0o7777
        wanted = current & mode & ~umask
        if wanted != current:
            os.chmod(path, wanted)
