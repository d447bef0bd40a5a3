"""The check that a body is the media it claims: its Content-Type, then its first bytes."""

from __future__ import annotations

import gzip

import pytest

from storage.sniff import HEAD_SIZE, KINDS, wrong_start, wrong_type
from tests.media_server import STARTS

MP4 = STARTS["mp4"]
# The first bytes of files of each format, as their makers write them.
VIDEOS = {
    "mp4": MP4,
    "mov": b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00",
    "old quicktime": b"\x00\x00\x00\x08wide\x00\x00\x00\x00mdat",
    "quicktime moov": b"\x00\x00\x6c\x8fmoov\x00\x00\x00\x6clmvhd",
    "webm": b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81",
    "avi": b"RIFF\x00\x10\x00\x00AVI LIST",
}
IMAGES = {
    "png": STARTS["png"],
    "jpeg": STARTS["jpeg"],
    "webp": b"RIFF\x1a\x00\x00\x00WEBPVP8 ",
    "gif": b"GIF89a\x01\x00\x01\x00\x80\x00",
    "avif": b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00",
    "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00",
}
AUDIO = {
    "mp3 with ID3": STARTS["mp3"],
    "mp3 frame": b"\xff\xfb\x90\x64\x00\x00\x00\x00\x00\x00\x00\x00",
    "aac adts": b"\xff\xf1\x50\x80\x02\x1f\xfc\x21\x00\x00\x00\x00",
    "wav": STARTS["wav"],
    "m4a": b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00",
    "ogg": b"OggS\x00\x02\x00\x00\x00\x00\x00\x00",
    "flac": b"fLaC\x00\x00\x00\x22\x10\x00\x10\x00",
}
FILES = {"video": VIDEOS, "image": IMAGES, "audio": AUDIO}


@pytest.mark.parametrize(
    ("kind", "head"),
    [(kind, head) for kind, files in FILES.items() for head in files.values()],
    ids=[f"{kind}-{name}" for kind, files in FILES.items() for name in files],
)
def test_each_format_passes_as_its_kind(kind: str, head: bytes) -> None:
    """The first bytes of every format a kind may come in pass, from HEAD_SIZE bytes on."""
    assert wrong_start(kind, (head + bytes(HEAD_SIZE))[:HEAD_SIZE]) is None


@pytest.mark.parametrize(
    ("kind", "head", "looks"),
    [
        ("video", b"<h1>403 Forbidden</h1>", "HTML"),
        ("video", b"\n  <!DOCTYPE html><html>", "HTML"),
        ("image", b'{"error": "expired"}', "JSON"),
        ("audio", b"<?xml version='1.0'?><Error>", "XML"),
        ("video", gzip.compress(MP4 * 4)[:HEAD_SIZE], "gzip"),
        ("video", b"status 500\n", "text: 'status 500\\n'"),
        ("video", STARTS["png"], "a PNG image"),
        ("image", STARTS["mp3"], "an MP3 file"),
        ("audio", STARTS["jpeg"], "a JPEG image"),
        ("image", b"RIFF\x24\x00\x00\x00WAVEfmt ", "a WAV file"),
        ("video", b"", "it is empty"),
        ("video", b"\x00\x01\x02\x03\x04\x05\x06\x07\x08", "bytes 00 01 02 03 04 05 06 07"),
    ],
)
def test_other_bytes_are_named_in_the_refusal(kind: str, head: bytes, looks: str) -> None:
    """A body that is not the kind is refused with a sentence saying what it looks like."""
    refusal = wrong_start(kind, head)
    assert refusal is not None
    assert refusal.startswith(f"the body is not {KINDS[kind]}: ")
    assert looks in refusal


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "video/mp4",
        "image/png",
        "audio/mpeg",
        "VIDEO/MP4; codecs=avc1",
        "application/octet-stream",
        "binary/octet-stream",
        "application/mp4",
    ],
)
def test_media_and_neutral_types_pass(content_type: str | None) -> None:
    """Media types, octet-stream and no type at all leave the decision to the bytes."""
    assert wrong_type("video", content_type) is None


@pytest.mark.parametrize(
    "content_type",
    ["text/html; charset=utf-8", "application/json", "text/plain", "application/xml"],
)
def test_documents_are_refused_by_their_type(content_type: str) -> None:
    """A web page, JSON or text is no video, whatever its bytes."""
    refusal = wrong_type("video", content_type)
    assert refusal == f"the server sent {content_type.split(';')[0]}, not a video"
