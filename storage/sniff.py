"""Whether a body holds the kind of media it should: its Content-Type, then its first bytes.

A kind is "video", "image" or "audio". Each check returns None when the body may be
that kind, or a sentence that says why it is not. Only the leading bytes are looked
at: this tells an error page or a compressed blob from a media file, it does not
check that the file is well formed.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["HEAD_SIZE", "KINDS", "wrong_start", "wrong_type"]

HEAD_SIZE = 16
"""The leading bytes judged: the longest signature below needs 12."""

KINDS = {"video": "a video", "image": "an image", "audio": "audio"}
"""The kinds of media a body can be checked against, each as a message names it."""

_VIDEO, _IMAGE, _AUDIO = frozenset({"video"}), frozenset({"image"}), frozenset({"audio"})
# Types a server may give any media file: the bytes decide.
_NEUTRAL_TYPES = {
    "",
    "application/octet-stream",
    "binary/octet-stream",
    "application/mp4",
    "application/ogg",
}
_MEDIA_TOP_TYPES = {"video", "image", "audio"}
# QuickTime files may open with one of these atoms rather than `ftyp`.
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


def _riff(form: bytes) -> Callable[[bytes], bool]:
    return lambda head: head[:4] == b"RIFF" and head[8:12] == form


def _mpeg_frame(head: bytes) -> bool:
    """An MPEG audio frame sync (MP3, and AAC in ADTS): eleven set bits."""
    return len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0


# (what a message calls it, the kinds it may be, whether the first bytes are it)
_FORMATS: tuple[tuple[str, frozenset[str], Callable[[bytes], bool]], ...] = (
    # ISO base media files (MP4, MOV, M4A, AVIF, HEIC) carry video, audio and images alike.
    ("an ISO media file", _VIDEO | _IMAGE | _AUDIO, lambda head: head[4:8] == b"ftyp"),
    ("a QuickTime movie", _VIDEO, lambda head: head[4:8] in _QUICKTIME_ATOMS),
    ("a Matroska or WebM file", _VIDEO | _AUDIO, lambda head: head[:4] == b"\x1a\x45\xdf\xa3"),
    ("an AVI video", _VIDEO, _riff(b"AVI ")),
    ("a PNG image", _IMAGE, lambda head: head[:8] == b"\x89PNG\r\n\x1a\n"),
    ("a JPEG image", _IMAGE, lambda head: head[:3] == b"\xff\xd8\xff"),
    ("a GIF image", _IMAGE, lambda head: head[:6] in (b"GIF87a", b"GIF89a")),
    ("a WebP image", _IMAGE, _riff(b"WEBP")),
    ("a WAV file", _AUDIO, _riff(b"WAVE")),
    ("an MP3 file", _AUDIO, lambda head: head[:3] == b"ID3"),
    ("an Ogg file", _AUDIO | _VIDEO, lambda head: head[:4] == b"OggS"),
    ("a FLAC file", _AUDIO, lambda head: head[:4] == b"fLaC"),
    ("MPEG audio", _AUDIO, _mpeg_frame),
)


def wrong_type(kind: str, content_type: str | None) -> str | None:
    """Why a body with this Content-Type cannot be `kind`; None if it may be.

    Any video, image or audio type passes (CDNs label files loosely, and the first
    bytes are checked anyway), as do octet-stream and no type at all.
    """
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type in _NEUTRAL_TYPES or media_type.split("/")[0] in _MEDIA_TOP_TYPES:
        return None
    return f"the server sent {media_type}, not {KINDS[kind]}"


def wrong_start(kind: str, head: bytes) -> str | None:
    """Why a body that starts with `head` is not `kind`; None if it starts like one."""
    for _, kinds, matches in _FORMATS:
        if matches(head) and kind in kinds:
            return None
    return f"the body is not {KINDS[kind]}: {_describe(head)}"


def _describe(head: bytes) -> str:
    """What the first bytes look like, for a person reading the error."""
    if not head:
        return "it is empty"
    for name, _, matches in _FORMATS:
        if matches(head):
            return f"it starts like {name}"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n").lower()
    if text.startswith(b"<?xml"):
        return "it starts like XML"
    if text.startswith(b"<"):
        return "it starts like HTML"
    if text.startswith((b"{", b"[")):
        return "it starts like JSON"
    if head[:2] == b"\x1f\x8b":
        return "it starts like gzip-compressed data"
    if head[:4] == b"PK\x03\x04":
        return "it starts like a ZIP archive"
    if head[:5] == b"%PDF-":
        return "it starts like a PDF"
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return f"it starts like text: {head.decode('ascii')!r}"
    return f"it starts with the bytes {head[:8].hex(' ')}"
