"""Counters of what the pipeline did.

Stages bump plain integer attributes (cheap on the hot path: no locks, no label lookups);
``StatsCollector`` turns them into Prometheus metrics only when scraped, and ``summary``
into the run's JSON summary line.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Stats"]


@dataclass(eq=False)
class Stats:
    received: int = 0
    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0  # dead-lettered: validation, database or poison
    acked: int = 0
    ack_failures: int = 0
    released: int = 0
    extended: int = 0
    batches: int = 0
    rejected_by_rule: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # by dependency: sqs, postgres
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> dict:
        elapsed = time.monotonic() - self.started
        return {
            "received": self.received,
            "inserted": self.inserted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "acked": self.acked,
            "ack_failures": self.ack_failures,
            "released": self.released,
            "visibility_extended": self.extended,
            "rejected_by_rule": dict(self.rejected_by_rule),
            "errors": dict(self.errors),
            "elapsed_s": round(elapsed, 3),
            "rate_per_s": round(self.inserted / elapsed, 1) if elapsed > 0 else 0.0,
        }
