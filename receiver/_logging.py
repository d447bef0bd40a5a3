"""One JSON object per log line, so deliveries can be counted and searched."""

from __future__ import annotations

import json
import logging
import sys
from itertools import islice
from typing import Any

from receiver._clock import stamp

__all__ = ["configure_logging"]

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


class JSONFormatter(logging.Formatter):
    """Time, level, logger, message and every `extra=` field, as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # `extra=` fields follow the standard attributes; skipping those saves testing each.
        fields = vars(record)
        if len(fields) > _FIRST:
            for key, value in islice(fields.items(), _FIRST, None):
                if key not in _STANDARD:
                    entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


def configure_logging(level: str) -> None:
    """Send the service's and uvicorn's logs to stderr as JSON lines."""
    # A line per delivery: skip what the JSON never shows (caller's file and line, thread,
    # process), which costs more than formatting the line.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The access log prints request paths, and callback paths carry their token.
    logging.getLogger("uvicorn.access").disabled = True
