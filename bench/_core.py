"""What a benchmark hands back: rows of measurements, goals checked against them, notes.

Every throughput is also given as a ratio against a baseline measured in the
same run, round by round, because the machines these run on are shared and
noisy: the absolute figures say how fast, the ratios say whether it is good.
"""

from __future__ import annotations

import argparse
import enum
import random
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

__all__ = [
    "BenchError",
    "Benchmark",
    "Goal",
    "Report",
    "Role",
    "Row",
    "paired_ratio",
    "shuffled_rounds",
]

_S = TypeVar("_S")


class BenchError(Exception):
    """A benchmark could not run (a tool is missing, a download came back wrong)."""


class Role(enum.Enum):
    baseline = "baseline"  # the yardstick the other rows are divided by
    subject = "subject"  # the service's own path, which the goals judge
    reference = "reference"  # shown for comparison; no goal depends on it


@dataclass(frozen=True, slots=True)
class Row:
    """One subject's figures over the rounds of one benchmark."""

    subject: str
    role: Role
    unit: str
    samples: tuple[float, ...]
    ratio: float | None = None  # median of per-round ratios to the baseline
    rss_growth_mib: float | None = None  # the largest over the rounds

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass(frozen=True, slots=True)
class Goal:
    """A target the project set, and whether this run met it."""

    target: str
    measured: str
    passed: bool


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one benchmark measured in one run."""

    name: str
    setup: tuple[str, ...]
    rows: tuple[Row, ...]
    goals: tuple[Goal, ...] = ()
    notes: tuple[str, ...] = field(default=())


class Benchmark(Protocol):
    """A module in `bench/` whose name does not start with `_`.

    It may also define `preflight(options) -> None`, raising BenchError when something it
    needs is missing: `python -m bench` calls every selected one's before running any.
    """

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Declare this benchmark's own options (prefixed with its name when they could clash)."""
        ...

    def run(self, options: argparse.Namespace) -> Report:
        """Measure, and say how it went."""
        ...


def paired_ratio(subject: Sequence[float], baseline: Sequence[float]) -> float:
    """The median, over rounds, of subject ÷ baseline within the same round."""
    if len(subject) != len(baseline) or not subject:
        raise ValueError("paired samples must be non-empty and of equal length")
    return statistics.median(s / b for s, b in zip(subject, baseline, strict=True))


def shuffled_rounds(subjects: Sequence[_S], rounds: int, seed: int) -> Iterator[tuple[int, _S]]:
    """(round number from 1, subject): every subject once a round, in an order drawn anew
    each round from `seed`.

    Shuffled, not rotated: a rotation keeps each subject behind the same one every round,
    and what one run leaves behind (freed page cache, pending writeback) can slow the next.
    """
    shuffler = random.Random(seed)
    for number in range(1, rounds + 1):
        for subject in shuffler.sample(subjects, len(subjects)):
            yield number, subject
