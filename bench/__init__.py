"""Benchmarks for kling-receiver: `python -m bench [NAME ...]` runs them and prints one table.

Each public module here (`burst`, `download`, `ingest`, `s3`, `workers`) is a
`Benchmark`: `add_arguments(group)` declares its options and `run(options)`
returns a `Report` whose rows carry absolute figures and ratios against a
baseline measured in the same run. Nothing here is a test; nothing asserts
on time.
"""

from __future__ import annotations

from bench._core import BenchError, Benchmark, Goal, Report, Role, Row, paired_ratio

__all__ = ["BenchError", "Benchmark", "Goal", "Report", "Role", "Row", "paired_ratio"]
