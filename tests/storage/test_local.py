"""The local sink: hidden partial files, atomic commit, resume, refused keys and open_sink."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from storage import LocalSink, SinkError, open_sink
from tests.media_server import MediaServer

ROOT = Path(__file__).resolve().parents[2]
DATA = bytes(range(256)) * 40


@pytest.fixture
def sink(tmp_path: Path) -> LocalSink:
    """A local sink rooted in a directory that does not exist yet."""
    return LocalSink(tmp_path / "assets")


def files(directory: Path) -> set[str]:
    """Every file under `directory`, relative to it."""
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def view(data: bytes) -> memoryview:
    return memoryview(data)


def test_nothing_is_visible_under_the_final_name_before_commit(sink: LocalSink) -> None:
    """Until commit only the hidden .part (and its note) exist; after it, the file and sidecar."""
    writer = sink.open("videos/t/0")
    writer.restart('"v1"')
    writer.write(view(DATA))
    assert files(sink.root) == {"videos/t/.0.part"}  # too few bytes to be worth a note
    writer.write(view(bytes(1 << 20)))
    assert files(sink.root) == {"videos/t/.0.part", "videos/t/.0.part.json"}
    location = writer.commit("videos/t/0.mp4", {"sha256": "abc", "size": len(DATA)})
    assert location == str(sink.root / "videos/t/0.mp4")
    assert files(sink.root) == {"videos/t/0.mp4", "videos/t/0.mp4.json"}
    assert Path(location).read_bytes() == DATA + bytes(1 << 20)
    sidecar = json.loads((sink.root / "videos/t/0.mp4.json").read_text())
    assert sidecar == {"sha256": "abc", "size": len(DATA)}
    writer.discard()
    assert files(sink.root) == {"videos/t/0.mp4", "videos/t/0.mp4.json"}


def test_a_commit_stays_beside_its_stem(sink: LocalSink) -> None:
    """A writer commits only under its stem's directory, and only a safe name."""
    writer = sink.open("videos/t/0")
    writer.write(view(DATA))
    with pytest.raises(ValueError, match="not beside"):
        writer.commit("videos/u/0.mp4", {})
    with pytest.raises(SinkError, match="unsafe"):
        writer.commit("videos/t/..", {})
    assert files(sink.root) == {"videos/t/.0.part"}
    writer.discard()


def test_a_link_in_place_of_the_part_file_is_not_followed(sink: LocalSink, tmp_path: Path) -> None:
    """A .part planted as a symbolic link to a file elsewhere is refused, not written through."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    (sink.root / "videos/t").mkdir(parents=True)
    (sink.root / "videos/t/.0.part").symlink_to(outside)
    with pytest.raises(SinkError):
        sink.open("videos/t/0")
    assert outside.read_bytes() == b"keep"


def test_commit_replaces_an_earlier_copy(sink: LocalSink) -> None:
    """Downloading the same key again replaces the stored file and its sidecar."""
    for content, note in ((b"old", "first"), (DATA, "second")):
        writer = sink.open("images/t/0")
        writer.write(view(content))
        writer.commit("images/t/0.png", {"note": note})
    assert (sink.root / "images/t/0.png").read_bytes() == DATA
    assert json.loads((sink.root / "images/t/0.png.json").read_text()) == {"note": "second"}


HOSTILE = [
    "../../etc/passwd",
    "a/../../b",
    "a/..",
    "/etc/passwd",
    "..",
    ".",
    "a/./b",
    "a//b",
    "a/",
    "",
    "a/\x00b",
    "a\x00",
    ".hidden",
    "a/.0.part",
    "..\\..\\etc\\passwd",
    "~/x",
    "a/b c",
]


@pytest.mark.parametrize("key", HOSTILE)
def test_hostile_keys_are_refused_and_write_nothing(tmp_path: Path, key: str) -> None:
    """A key that could leave the root or pose as a partial file is refused, writing nothing."""
    sink = LocalSink(tmp_path / "root" / "assets")
    with pytest.raises(SinkError):
        sink.path(key)
    with pytest.raises(SinkError):
        sink.open(key)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", HOSTILE)
def test_commit_under_a_hostile_key_keeps_the_part(sink: LocalSink, key: str) -> None:
    """Commit refuses a hostile key and leaves the held bytes where they were."""
    writer = sink.open("videos/t/0")
    writer.write(view(DATA))
    with pytest.raises(SinkError):
        writer.commit(key, {})
    writer.close()
    assert files(sink.root) == {"videos/t/.0.part"}


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path, sink: LocalSink) -> None:
    """A key through a symlink that points outside the root is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    sink.root.mkdir()
    (sink.root / "videos").symlink_to(outside)
    with pytest.raises(SinkError, match="leaves the storage directory"):
        sink.open("videos/t/0")
    assert list(outside.iterdir()) == []


def test_safe_keys_stay_under_the_root(sink: LocalSink) -> None:
    """Ordinary keys map to paths under the root."""
    assert sink.path("videos/text2video/8672/0.mp4") == sink.root / "videos/text2video/8672/0.mp4"
    assert sink.location("a/b=c+d_e-f.g") == str(sink.root / "a/b=c+d_e-f.g")


def test_open_resumes_an_earlier_attempt(sink: LocalSink) -> None:
    """A writer opened after a closed one holds its bytes and validator, hashing them."""
    first = sink.open("videos/t/0")
    first.restart('"v1"')
    first.write(view(DATA[:1000]))
    first.close()
    second = sink.open("videos/t/0")
    assert (second.offset, second.validator) == (1000, '"v1"')
    assert second.hasher().hexdigest() == hashlib.sha256(DATA[:1000]).hexdigest()
    second.write(view(DATA[1000:]))
    location = second.commit("videos/t/0.mp4", {})
    assert Path(location).read_bytes() == DATA


def test_bytes_without_a_validator_are_not_resumed(sink: LocalSink) -> None:
    """Held bytes that no validator vouches for are dropped on open."""
    first = sink.open("videos/t/0")
    first.write(view(DATA))
    first.close()
    second = sink.open("videos/t/0")
    assert (second.offset, second.validator) == (0, None)
    second.close()
    assert (sink.root / "videos/t/.0.part").stat().st_size == 0


@pytest.mark.parametrize("note", ["", '{"valid', "[1, 2]", '{"validator": 7}', "\udcff"])
def test_a_torn_note_starts_over(sink: LocalSink, note: str) -> None:
    """A .part.json torn by a crash is not an error: the download starts over."""
    first = sink.open("videos/t/0")
    first.restart('"v1"')
    first.write(view(DATA))
    first.close()
    (sink.root / "videos/t/.0.part.json").write_bytes(note.encode("utf-8", "surrogateescape"))
    second = sink.open("videos/t/0")
    assert (second.offset, second.validator) == (0, None)
    second.close()


def test_restart_drops_the_held_bytes(sink: LocalSink) -> None:
    """restart empties the .part and drops its note; the new validator is noted once the bytes
    are worth resuming, or when the writer stops with them."""
    note = sink.root / "videos/t/.0.part.json"
    writer = sink.open("videos/t/0")
    writer.restart('"v1"')
    writer.write(view(bytes(1 << 20)))
    assert json.loads(note.read_text()) == {"validator": '"v1"'}
    writer.restart('"v2"')
    assert (writer.offset, writer.validator) == (0, '"v2"')
    assert not note.exists()
    writer.write(view(b"fresh"))
    writer.close()
    assert json.loads(note.read_text()) == {"validator": '"v2"'}
    writer = sink.open("videos/t/0")
    assert (writer.offset, writer.validator) == (5, '"v2"')
    writer.restart(None)
    assert not note.exists()
    writer.write(view(b"new"))
    assert Path(writer.commit("videos/t/0.bin", {})).read_bytes() == b"new"


def test_discard_removes_the_held_bytes(sink: LocalSink) -> None:
    """discard removes the .part and its note; the next open starts from nothing."""
    writer = sink.open("videos/t/0")
    writer.restart('"v1"')
    writer.write(view(DATA))
    writer.discard()
    assert files(sink.root) == set()
    again = sink.open("videos/t/0")
    assert (again.offset, again.validator) == (0, None)
    again.discard()


def test_an_unwritable_directory_is_a_sink_error(sink: LocalSink) -> None:
    """When the .part's directory cannot be made, open raises SinkError, not OSError."""
    sink.root.mkdir()
    (sink.root / "videos").write_bytes(b"a file where a directory should be")
    with pytest.raises(SinkError) as caught:
        sink.open("videos/t/0")
    assert caught.value.retry is True


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from storage import LocalSink, SinkError, UrlPolicy, fetch

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
writer = LocalSink(Path(sys.argv[1])).open("videos/t/0")
try:
    fetch(sys.argv[2], writer, policy=UrlPolicy(allow_private=True))
except SinkError as exc:
    print("SinkError", exc.retry, exc.reason)
"""


def test_a_write_error_during_fetch_is_a_sink_error(tmp_path: Path, media: MediaServer) -> None:
    """A file-size limit hit mid-download surfaces from fetch as SinkError, not OSError."""
    url = media.add("/v.mp4", DATA * 4)
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path / "assets"), url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("SinkError True the file size limit"), done.stdout
    assert "EFBIG" in done.stdout


def test_open_sink_takes_a_path(tmp_path: Path) -> None:
    """A plain path is a local directory."""
    assert open_sink(str(tmp_path / "a")).root == (tmp_path / "a").resolve()


@pytest.mark.parametrize("prefix", ["file://", "file://localhost"])
def test_open_sink_takes_a_file_url(tmp_path: Path, prefix: str) -> None:
    """A file:// URL, with or without localhost, names a local directory, percent-decoded."""
    sink = open_sink(prefix + (tmp_path / "my%20assets").as_posix())
    assert sink.root == (tmp_path / "my assets").resolve()


def test_open_sink_refuses_a_remote_file_url() -> None:
    """A file:// URL naming another host is refused."""
    with pytest.raises(SinkError, match="local path"):
        open_sink("file://fileserver/srv/assets")


@pytest.mark.parametrize("url", ["ftp://host/dir", "gs://bucket"])
def test_open_sink_refuses_unsupported_schemes(url: str) -> None:
    """A storage URL scheme the service cannot write to is refused, naming it."""
    scheme = url.split(":", 1)[0]
    with pytest.raises(SinkError, match=f"{scheme}:// is not supported"):
        open_sink(url)


def test_a_second_writer_for_the_same_asset_is_refused_while_the_first_writes(
    sink: LocalSink,
) -> None:
    """Two writers never interleave bytes in one .part file: the second waits its turn."""
    first = sink.open("videos/text2video/T1/0")
    first.write(view(b"first"))
    with pytest.raises(SinkError, match="another download") as refused:
        sink.open("videos/text2video/T1/0")
    assert refused.value.retry
    first.close()
    second = sink.open("videos/text2video/T1/0")
    second.discard()


def test_a_full_disk_makes_the_sink_unavailable(tmp_path: Path) -> None:
    """ENOSPC is said as a full disk, and marks the whole sink unavailable (downloads wait)."""
    writer = LocalSink(tmp_path).open("videos/t/0")
    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch("storage.local.os.write", side_effect=full), pytest.raises(SinkError) as caught:
        writer.write(memoryview(b"x"))
    assert caught.value.unavailable and caught.value.retry
    assert caught.value.reason.startswith("the disk is full: no space left to write")


def test_check_reports_a_full_disk(tmp_path: Path) -> None:
    """check() is None with room to write, and names the directory when the disk is full."""
    sink = LocalSink(tmp_path / "assets")
    assert sink.check() is None
    usage = shutil.disk_usage(tmp_path)._replace(free=1 << 20)
    with mock.patch("storage.local.shutil.disk_usage", return_value=usage):
        assert sink.check() == f"the disk holding {sink.root} is full (1 MiB free)"
