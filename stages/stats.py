"""The plain counters the stages bump, and the run's summary.

Stages bump plain integer attributes (cheap on the hot path: no locks, no label lookups);
``pipeline.metrics`` turns them into Prometheus metrics only when scraped. The histograms are
plain bucket counts too. This module depends on nothing, so loading a stage loads no
metrics library.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["Stats", "Buckets", "BATCH_SIZE_BUCKETS", "LATENCY_BUCKETS", "RTT_BUCKETS", "SQS_OPERATIONS"]

BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 50000)
_NO_ATTRS: dict = {}
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
# Round trips of SQS calls: loopback is ~1 ms, a region 10-20 ms, cross-region 50 ms and more;
# an empty long poll lasts up to ``wait_time_seconds``.
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)
SQS_OPERATIONS = ("ReceiveMessage", "DeleteMessageBatch")


class Buckets:
    """A histogram as plain ints: ``counts[i]`` holds observations ``<= bounds[i]`` (not cumulative)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


@dataclass(eq=False)
class Stats:
    received: int = 0
    inserted: int = 0
    duplicates: int = 0
    copy_conflicts: int = 0  # direct COPY batches that met a stored key and were written again as upserts
    rejected: int = 0  # dead-lettered: validation, database or poison
    acked: int = 0
    ack_failures: int = 0
    released: int = 0
    extended: int = 0
    batches: int = 0
    rejected_by_rule: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # by dependency: sqs, postgres
    outages: Counter = field(default_factory=Counter)  # by dependency: times it became unreachable (stages.outage)
    unreachable: set = field(default_factory=set)  # dependencies unreachable now
    # Dead letters SQS refused for good (by error code): left on the source queue, never deleted.
    dead_letters_refused: Counter = field(default_factory=Counter)
    dead_letter_retries_exhausted: int = 0  # transient DLQ failures given up on: the message comes back
    started: float = field(default_factory=time.monotonic)
    batch_sizes: Buckets = field(default_factory=lambda: Buckets(BATCH_SIZE_BUCKETS))
    latency: Buckets = field(default_factory=lambda: Buckets(LATENCY_BUCKETS))
    # Round trip per SQS operation (the adaptive limits' signal), and those limits now.
    rtt: dict[str, Buckets] = field(default_factory=lambda: {op: Buckets(RTT_BUCKETS) for op in SQS_OPERATIONS})
    concurrency: dict[str, int] = field(default_factory=dict)  # "receive" / "delete" -> current limit

    def observe_commit(self, msgs: list) -> None:
        """``CopySink``'s hook after a commit: batch size in rows, and SentTimestamp→commit per row.

        ``msgs`` holds one item per row: a message dict, or an event of a multi-event message
        (``stages.parts.Part``, whose ``msg`` is its message).
        """
        self.batch_sizes.observe(len(msgs))
        now_ms = time.time() * 1000
        bounds, counts = self.latency.bounds, self.latency.counts
        total = seconds = 0.0
        last: dict | None = None
        bucket = -1
        for m in msgs:
            if type(m) is not dict:
                m = m.msg  # the events of one message come in a run and share its SentTimestamp
            if m is not last:
                last = m
                sent = (m.get("Attributes") or _NO_ATTRS).get("SentTimestamp")
                if sent is None:
                    bucket = -1
                    continue
                seconds = max(0.0, now_ms - int(sent)) / 1000
                bucket = bisect_left(bounds, seconds)
            elif bucket < 0:
                continue
            counts[bucket] += 1
            total += seconds
        self.latency.sum += total

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
            "dead_letters_refused": dict(self.dead_letters_refused),
            "dead_letter_retries_exhausted": self.dead_letter_retries_exhausted,
            "errors": dict(self.errors),
            "outages": dict(self.outages),
            "elapsed_s": round(elapsed, 3),
            "rate_per_s": round(self.inserted / elapsed, 1) if elapsed > 0 else 0.0,
        }
