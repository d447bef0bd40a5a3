"""The progress bar of long commands: drawn in place on a terminal, quiet elsewhere."""

from __future__ import annotations

import io

from receiver._progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_line_redrawn_in_place() -> None:
    screen = Terminal()
    bar = Progress(screen)
    bar.show(1, 4, "tasks", force=True)
    bar.show(2, 4, "tasks", force=True)
    bar.show(4, 4, "tasks")  # the last step is always drawn
    bar.close()
    frames = screen.getvalue().split("\r")[1:]
    assert frames[0] == "[######..................] 1/4 tasks"
    assert frames[-1] == "[########################] 4/4 tasks\n"
    assert screen.getvalue().count("\n") == 1


def test_a_shorter_line_wipes_the_longer_one_before_it() -> None:
    screen = Terminal()
    bar = Progress(screen)
    bar.show(1, None, "a long description", force=True)
    bar.show(2, None, "short", force=True)
    assert screen.getvalue().split("\r")[-1] == "2 short".ljust(len("1 a long description"))


def test_nothing_is_drawn_where_there_is_no_terminal_unless_lines_are_asked_for() -> None:
    quiet, logged = io.StringIO(), io.StringIO()
    Progress(quiet).show(1, 2, "tasks", force=True)
    lines = Progress(logged, lines=True)
    lines.show(1, 2, "tasks")
    lines.show(2, 2, "tasks")
    lines.close()
    assert quiet.getvalue() == ""
    assert logged.getvalue() == "1/2 tasks\n2/2 tasks\n"
