"""Sample files of each kind Kling makes, for `kling-receiver trigger`.

The service serves them itself at PUBLIC_URL + SAMPLES_PATH, so a sample callback names
files that any running service can fetch; its download policy lets that one prefix of its
own address through (`storage.UrlPolicy.own_samples`).
"""

from __future__ import annotations

from importlib import resources

__all__ = ["SAMPLES", "SAMPLES_PATH", "sample_bytes"]

SAMPLES_PATH = "/samples/"
# Each file, by kind, with its content type (audio has both of the current standard's forms).
SAMPLES = {
    "video": {"sample.mp4": "video/mp4"},
    "image": {"sample.png": "image/png"},
    "audio": {"sample.mp3": "audio/mpeg", "sample.wav": "audio/wav"},
}


def sample_bytes(name: str) -> tuple[bytes, str] | None:
    """A sample file's bytes and content type; None for any other name."""
    for files in SAMPLES.values():
        if name in files:
            return resources.files(__name__).joinpath(name).read_bytes(), files[name]
    return None
