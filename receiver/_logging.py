"""Log lines: one JSON object each, so deliveries can be counted and searched; or, on a
terminal, a line a person reads (time, level, message, fields), coloured when it can be."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from itertools import islice
from typing import Any, TextIO

from receiver._clock import stamp

__all__ = ["configure_logging", "wants_text"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


# Attributes every LogRecord has before its `extra=` fields, which come after them.
_FIRST = len(vars(logging.makeLogRecord({})))
# json.dumps(entry, default=str) builds an encoder on each call; this one is built once.
_ENCODER = json.JSONEncoder(default=str)


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra=` fields."""
    # They follow the standard attributes; skipping those saves testing each.
    fields = vars(record)
    if len(fields) <= _FIRST:
        return {}
    return {
        key: value for key, value in islice(fields.items(), _FIRST, None) if key not in _STANDARD
    }


class JSONFormatter(logging.Formatter):
    """Time, level, logger, message and every `extra=` field, as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extra(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


_COLOURS = {"DEBUG": "2", "INFO": "32", "WARNING": "33", "ERROR": "31", "CRITICAL": "1;31"}


class TextFormatter(logging.Formatter):
    """`12:04:05 INFO  message  key=value ...`: local time, level, message, then the fields."""

    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = self._paint(f"{record.levelname:<7}", _COLOURS.get(record.levelname, "0"))
        parts = [f"{clock} {level} {record.getMessage()}"]
        for key, value in _extra(record).items():
            shown = value if isinstance(value, str) and _bare(value) else _ENCODER.encode(value)
            parts.append(f"{self._paint(key, '2')}={shown}")
        line = "  ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _bare(text: str) -> bool:
    """Whether a value reads unambiguously without quotes."""
    return bool(text) and text.isprintable() and not any(c in text for c in ' ="')


def wants_text(log_format: str, stream: TextIO) -> bool:
    """LOG_FORMAT=text, or auto with a terminal to write to."""
    return log_format == "text" or (log_format == "auto" and stream.isatty())


def _colour(stream: TextIO) -> bool:
    # https://no-color.org: any non-empty NO_COLOR turns colour off.
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def configure_logging(level: str, log_format: str = "json", stream: TextIO | None = None) -> None:
    """Send the service's and uvicorn's logs to `stream` (stderr): JSON lines, or text lines
    for a person (see `wants_text`)."""
    # A line per delivery: skip what the lines never show (caller's file and line, thread,
    # process), which costs more than formatting the line.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    if wants_text(log_format, out):
        handler.setFormatter(TextFormatter(colour=_colour(out)))
    else:
        handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The access log prints request paths, and callback paths carry their token.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs each request's whole URL at INFO: an event endpoint's token in its query
    # (or a key in KLING_API_BASE's, a presigned S3 signature) would be written in clear.
    # What the service sends is logged by its own lines, with URLs redacted.
    logging.getLogger("httpx").setLevel(logging.WARNING)
