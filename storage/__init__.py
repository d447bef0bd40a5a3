"""storage: bytes from a URL into a place (a local directory, later an S3 bucket).

This package never imports `receiver`.
"""

from __future__ import annotations

__all__: list[str] = []
