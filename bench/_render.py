"""The plain-text table `python -m bench` prints (and BENCHMARKS.md quotes verbatim)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from bench._core import Report, Row

__all__ = ["render"]


def _number(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(line[i]) for line in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(padded).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _row(row: Row) -> list[str]:
    return [
        row.subject,
        row.role.value,
        f"{_number(row.median)} {row.unit}",
        " ".join(_number(s) for s in row.samples),
        "-" if row.ratio is None else f"{row.ratio:.2f}",
        "-" if row.rss_growth_mib is None else f"{row.rss_growth_mib:.1f} MiB",
    ]


def render(facts: Sequence[tuple[str, str]], command: str, reports: Sequence[Report]) -> str:
    """The header (machine, command) and one block per benchmark."""
    label = max(len(key) for key, _ in [*facts, ("command", "")])
    lines = [f"{key.ljust(label)}  {value}" for key, value in [*facts, ("command", command)]]
    for report in reports:
        lines += ["", f"== {report.name} ==", *report.setup, ""]
        lines += _table(
            ["subject", "role", "median", "per round", "ratio", "peak RSS growth"],
            [_row(row) for row in report.rows],
            right={2, 4, 5},
        )
        if report.goals:
            lines.append("")
            lines += _table(
                ["goal", "measured", "verdict"],
                [[g.target, g.measured, "PASS" if g.passed else "FAIL"] for g in report.goals],
                right={1},
            )
        if report.notes:
            lines.append("")
            for note in report.notes:
                lines += textwrap.wrap(note, width=100, initial_indent="- ", subsequent_indent="  ")
    return "\n".join(lines)
