"""A progress bar for long commands, drawn on a terminal and silent elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]

_WIDTH = 24
_REDRAW = 0.1  # seconds between redraws: a terminal need not draw every step


class Progress:
    """`[#######.................] 120/400 text`, redrawn in place on a terminal.

    Where `stream` is not a terminal (a log, a pipe) nothing is drawn unless `lines`,
    which writes each update on a line of its own: the command's result says the rest.
    """

    def __init__(self, stream: TextIO | None = None, *, lines: bool = False) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.terminal = self.stream.isatty()
        self.lines = lines
        self._drawn = 0.0
        self._width = 0

    def show(self, done: int, total: int | None, text: str = "", *, force: bool = False) -> None:
        if self.terminal:
            now = time.monotonic()
            if not force and now - self._drawn < _REDRAW and done != total:
                return
            self._drawn = now
            line = _bar(done, total, text)
            # Spaces wipe what a longer line before left behind.
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
            self.stream.flush()
        elif self.lines:
            print(text if total is None else f"{done}/{total} {text}", file=self.stream)

    def close(self) -> None:
        """End the bar's line, so what is printed next starts on a line of its own."""
        if self.terminal and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def _bar(done: int, total: int | None, text: str) -> str:
    if not total:
        return f"{done} {text}".rstrip()
    filled = min(_WIDTH, done * _WIDTH // total)
    return f"[{'#' * filled}{'.' * (_WIDTH - filled)}] {done}/{total} {text}".rstrip()
