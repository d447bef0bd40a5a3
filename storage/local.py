"""The local-directory sink: nothing partial is ever visible under a final name.

Bytes go to a hidden `.NAME.part` file in the target directory (with a
`.NAME.part.json` noting the validator they came with, so a later attempt can
resume with Range, once there is enough to be worth resuming or the attempt
stops early). Commit fsyncs the file, renames it into place, writes the JSON
sidecar the same way, and fsyncs the directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from storage._errors import SinkError
from storage.fetch import READ_SIZE
from storage.naming import key_parts

__all__ = ["LocalSink", "LocalWriter"]

# Written bytes left dirty in the page cache before the kernel is asked to start writing them out.
_WRITE_BEHIND = 8 << 20
# Larger write() calls into the page cache were up to 5x slower, and erratic, on the benchmark
# machine (Linux 6.18, ext4; dd shows it too). 16 KiB ones, the size curl writes, ran
# steadily; 64 KiB ones did for a while, then did not. See BENCHMARKS.md.
_WRITE_MAX = 16 << 10
# Held bytes worth a note of their validator while the download runs, so that they can be
# resumed after a crash; fewer are simply fetched again, and most files never need a note.
_NOTE_FROM = 1 << 20
# Below this much free space the sink reports itself unavailable and downloads wait.
_MIN_FREE = 16 << 20


class LocalSink:
    """Files under one root directory, at `root/key`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        """Where `key` lives; refuses any key that could leave the root."""
        path = self.root.joinpath(*key_parts(key))
        if not path.resolve().is_relative_to(self.root):
            raise SinkError(key, f"storage key {key!r} leaves the storage directory", retry=False)
        return path

    def directory(self, stem: str) -> Path:
        """The directory `stem` (a key without its extension) is written in, checked as `path`
        checks a key. A writer's files are all named within it, so none needs that check again:
        key parts hold no `/` or `..`, renames replace a link rather than follow it, and the
        .part file is opened without following one."""
        parts = key_parts(stem)
        folder = self.root.joinpath(*parts[:-1])
        if not folder.resolve().is_relative_to(self.root):
            raise SinkError(stem, f"storage key {stem!r} leaves the storage directory", retry=False)
        return folder

    def location(self, key: str) -> str:
        return str(self.path(key))

    def check(self) -> str | None:
        """None when files can be written under the root; otherwise what is wrong."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create the storage directory {self.root}: {exc.strerror or exc}"
        if not os.access(self.root, os.W_OK | os.X_OK):
            return f"the storage directory {self.root} is not writable by this process"
        free = shutil.disk_usage(self.root).free
        if free < _MIN_FREE:
            return f"the disk holding {self.root} is full ({free >> 20} MiB free)"
        return None

    def presign(self, location: str, seconds: int) -> str | None:
        """None: the service itself serves local files, through links it signs."""
        return None

    def open(self, stem: str) -> LocalWriter:
        """A writer for the key `stem` + extension, holding an earlier attempt's bytes."""
        return LocalWriter(self.directory(stem), stem)


class LocalWriter:
    """One download's bytes on their way into the sink."""

    def __init__(self, folder: Path, stem: str) -> None:
        self._folder = folder
        self._prefix, _, name = stem.rpartition("/")
        self._part = folder / f".{name}.part"
        self._meta = folder / f".{name}.part.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                # Leases keep one worker per asset; this lock makes sure of it on the disk.
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise SinkError(
                    str(folder / name), f"another download is writing {self._part}", retry=True
                ) from None
            self._validator = _held_validator(self._meta)
            self._noted = self._validator is not None  # the note on disk says so already
            self._offset = os.fstat(self._fd).st_size if self._validator else 0
            os.ftruncate(self._fd, self._offset)
            os.lseek(self._fd, self._offset, os.SEEK_SET)
            self._unflushed_from = self._offset
        except OSError as exc:
            raise _write_error(self._part, exc) from exc
        self._buffer = memoryview(bytearray(READ_SIZE))

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def validator(self) -> str | None:
        return self._validator

    def hasher(self) -> hashlib._Hash:
        digest = hashlib.sha256()
        with open(self._part, "rb") as held:
            remaining = self._offset
            while remaining:
                chunk = held.read(min(remaining, READ_SIZE))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
        return digest

    def head(self, size: int) -> bytes:
        """The first `size` held bytes (fewer if fewer are held)."""
        with self._errors():
            return os.pread(self._fd, min(size, self._offset), 0)

    def restart(self, validator: str | None) -> None:
        with self._errors():
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._offset = 0
            self._unflushed_from = 0
            self._validator = validator
            if self._noted:
                self._meta.unlink(missing_ok=True)
                self._noted = False

    def begin(self, content_type: str | None, final_url: str, size: int | None) -> None:
        """Nothing to prepare: the bytes already go to the hidden .part file."""

    def buffer(self) -> memoryview:
        """The one buffer every read goes into: `write` puts its bytes in the file at once."""
        return self._buffer

    def write(self, data: memoryview) -> None:
        with self._errors():
            while data:
                written = os.write(self._fd, data[:_WRITE_MAX])
                data = data[written:]
                self._offset += written
            if not self._noted and self._offset >= _NOTE_FROM:
                self._note()
        if self._offset - self._unflushed_from >= _WRITE_BEHIND:
            _start_writeback(self._fd, self._unflushed_from, self._offset - self._unflushed_from)
            self._unflushed_from = self._offset

    def commit(self, key: str, sidecar: dict[str, Any]) -> str:
        """Make the bytes visible as `key`, with `key.json` beside them; returns the path.

        Everything that can run out of space (the sidecar, both fsyncs) happens before
        the first rename, so a failed commit shows nothing under the final names.
        """
        prefix, _, name = key.rpartition("/")
        key_parts(key)  # refuses a name a path could misread
        if prefix != self._prefix:
            raise ValueError(f"{key!r} is not beside the stem this writer was opened for")
        final = self._folder / name
        meta_tmp = final.with_name(f".{final.name}.json.tmp")
        try:
            with open(meta_tmp, "w") as out:
                json.dump(sidecar, out, indent=2, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._part, final)
            os.replace(meta_tmp, final.with_name(final.name + ".json"))
            if self._noted:
                self._meta.unlink(missing_ok=True)
            _fsync_dir(self._folder)
        except OSError as exc:
            meta_tmp.unlink(missing_ok=True)
            raise _write_error(final, exc) from exc
        return str(final)

    def close(self) -> None:
        """Stop writing, keeping the held bytes (and a note of their validator) for a later
        attempt to resume."""
        if self._fd >= 0:
            if not self._noted and self._offset:
                with contextlib.suppress(SinkError):  # without a note, the next try starts over
                    self._note()
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Stop writing and remove the held bytes."""
        self.close()
        self._part.unlink(missing_ok=True)
        self._meta.unlink(missing_ok=True)

    def _note(self) -> None:
        """Write down the held bytes' validator beside them (none: nothing to resume)."""
        if self._validator is not None:
            with self._errors():
                self._meta.write_text(json.dumps({"validator": self._validator}))
            self._noted = True

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise _write_error(self._part, exc) from exc


def _write_error(path: Path, exc: OSError) -> SinkError:
    """A SinkError that says what a person can do; a full disk makes the whole sink unavailable."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = (
            f"the disk is full: no space left to write {path}; downloads resume once space is freed"
        )
        return SinkError(str(path), reason, unavailable=True)
    if exc.errno == errno.EFBIG:
        reason = (
            f"the file size limit of this process (ulimit -f) stopped the write of {path} (EFBIG)"
        )
        return SinkError(str(path), reason)
    return SinkError(str(path), f"cannot write {path}: {exc.strerror or exc}")


def _held_validator(meta: Path) -> str | None:
    """The validator noted beside held bytes; none (start over) if the note is missing or torn."""
    try:
        note = json.loads(meta.read_text())
    except (OSError, ValueError):  # none yet, or torn by a crash while it was written
        return None
    validator = note.get("validator") if isinstance(note, dict) else None
    return validator if isinstance(validator, str) else None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing these bytes to disk now, without waiting for it.

    Commit's fsync is then left with the last few MiB instead of the whole file,
    and a large download does not pile up gigabytes of dirty pages. On Linux,
    POSIX_FADV_DONTNEED starts writeback of the dirty pages in the range (and
    drops the ones already clean); it is advice, so its failure changes nothing.
    """
    if sys.platform == "linux":
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
