"""Counters of what this process has seen, for `/api/stats` and for tests."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Stats"]


@dataclass
class Stats:
    """Process-local counters; the ledger holds the durable truth."""

    deliveries: Counter[str] = field(default_factory=Counter)  # by outcome
    refused: Counter[str] = field(default_factory=Counter)  # by reason code

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"deliveries": dict(self.deliveries), "refused": dict(self.refused)}
