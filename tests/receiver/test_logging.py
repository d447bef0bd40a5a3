"""Log lines: JSON for machines, readable text for a person at a terminal."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from receiver._logging import JSONFormatter, TextFormatter, configure_logging, wants_text

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(message: str = "event sent", **extra: object) -> logging.LogRecord:
    made = logging.getLogger("receiver.test").makeRecord(
        "receiver.test", logging.WARNING, __file__, 1, message, (), None, extra=extra
    )
    return made


def test_text_lines_show_time_level_message_and_fields() -> None:
    line = TextFormatter(colour=False).format(
        record(msg_id="msg_1", status=500, error="HTTP 500", names=["A", "B"], retry_at=None)
    )
    assert re.fullmatch(
        r'\d\d:\d\d:\d\d WARNING event sent  msg_id=msg_1  status=500  error="HTTP 500"'
        r'  names=\["A", "B"\]  retry_at=null',
        line,
    ), line


def test_colour_paints_the_level_and_keys_but_not_the_words() -> None:
    painted = TextFormatter(colour=True).format(record(task_id="t1"))
    assert "\x1b[33m" in painted  # a warning is yellow
    assert ANSI.sub("", painted) == TextFormatter(colour=False).format(record(task_id="t1"))


def test_a_value_that_could_mislead_is_quoted() -> None:
    line = TextFormatter(colour=False).format(record(path="a b", forged="x=1", empty=""))
    assert 'path="a b"' in line and 'forged="x=1"' in line and 'empty=""' in line
    newline = TextFormatter(colour=False).format(record(body="one\ntwo"))
    assert "\n" not in newline and 'body="one\\ntwo"' in newline


def test_the_json_line_keeps_every_field() -> None:
    entry = json.loads(JSONFormatter().format(record(msg_id="msg_1", status=500)))
    assert entry["message"] == "event sent" and entry["level"] == "warning"
    assert entry["msg_id"] == "msg_1" and entry["status"] == 500


@pytest.mark.parametrize(
    ("log_format", "tty", "text"),
    [
        ("auto", True, True),
        ("auto", False, False),
        ("json", True, False),
        ("text", False, True),
    ],
)
def test_auto_means_text_on_a_terminal_only(log_format: str, tty: bool, text: bool) -> None:
    stream = Terminal() if tty else io.StringIO()
    assert wants_text(log_format, stream) is text
    configure_logging("INFO", log_format, stream)
    logging.getLogger("receiver.test").info("hello", extra={"n": 1})
    written = stream.getvalue()
    assert written.startswith("{") is not text
    assert "hello" in written


def test_no_color_turns_colour_off(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = Terminal()
    configure_logging("INFO", "auto", stream)
    logging.getLogger("receiver.test").info("painted")
    assert ANSI.search(stream.getvalue())
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Terminal()
    configure_logging("INFO", "auto", plain)
    logging.getLogger("receiver.test").info("plain")
    assert "plain" in plain.getvalue() and not ANSI.search(plain.getvalue())
