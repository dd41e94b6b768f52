"""Counters of what the pipeline did.

Stages bump plain integer attributes (cheap on the hot path: no locks, no label lookups);
``StatsCollector`` turns them into Prometheus metrics only when scraped, and ``summary``
into the run's JSON summary line. The two histograms (batch size, end-to-end latency) are
plain bucket counts too, filled once per committed batch by ``Stats.observe_commit``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Stats", "Buckets", "StatsCollector", "registry_for", "BATCH_SIZE_BUCKETS", "LATENCY_BUCKETS"]

BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 50000)
_NO_ATTRS: dict = {}
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


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
    rejected: int = 0  # dead-lettered: validation, database or poison
    acked: int = 0
    ack_failures: int = 0
    released: int = 0
    extended: int = 0
    batches: int = 0
    rejected_by_rule: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # by dependency: sqs, postgres
    started: float = field(default_factory=time.monotonic)
    batch_sizes: Buckets = field(default_factory=lambda: Buckets(BATCH_SIZE_BUCKETS))
    latency: Buckets = field(default_factory=lambda: Buckets(LATENCY_BUCKETS))

    def observe_commit(self, msgs: list[dict]) -> None:
        """``CopySink``'s hook after a commit: batch size, and SentTimestamp→commit per message."""
        self.batch_sizes.observe(len(msgs))
        now_ms = time.time() * 1000
        bounds, counts = self.latency.bounds, self.latency.counts
        total = 0.0
        for m in msgs:
            sent = (m.get("Attributes") or _NO_ATTRS).get("SentTimestamp")
            if sent is None:
                continue
            seconds = max(0.0, now_ms - int(sent)) / 1000
            counts[bisect_left(bounds, seconds)] += 1
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
            "errors": dict(self.errors),
            "elapsed_s": round(elapsed, 3),
            "rate_per_s": round(self.inserted / elapsed, 1) if elapsed > 0 else 0.0,
        }


class StatsCollector(Collector):
    """Reads a runtime's ``Stats``, queues and leases at scrape time.

    ``runtime`` is duck-typed (``stats``, ``queues``, ``leases``, ``settings``) so this module
    does not import the runner. Labels are rule and dependency names only: never a value.
    """

    def __init__(self, runtime: Any) -> None:
        self.rt = runtime

    def collect(self) -> Iterator[Metric]:
        s: Stats = self.rt.stats
        for name, value, doc in (
            ("pipeline_messages_received", s.received, "Messages received from SQS (redeliveries included)."),
            ("pipeline_rows_inserted", s.inserted, "Rows committed to PostgreSQL."),
            ("pipeline_duplicates", s.duplicates, "Messages whose row was already in the table (redeliveries)."),
            ("pipeline_messages_acked", s.acked, "Messages deleted from SQS."),
            ("pipeline_ack_failures", s.ack_failures, "Failed delete entries (the message comes back and is deduplicated)."),
            ("pipeline_messages_released", s.released, "Held messages made visible again on shutdown."),
            ("pipeline_visibility_extended", s.extended, "Visibility extensions of messages held too long."),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        rejected = CounterMetricFamily("pipeline_messages_rejected", "Messages dead-lettered, by rule.", labels=["rule"])
        for rule, n in sorted(s.rejected_by_rule.items()):
            rejected.add_metric([rule], n)
        yield rejected
        errors = CounterMetricFamily("pipeline_errors", "Failed calls to a dependency (retried).", labels=["dependency"])
        for dep in sorted({"sqs", "postgres", *s.errors}):
            errors.add_metric([dep], s.errors.get(dep, 0))
        yield errors

        depth = GaugeMetricFamily("pipeline_stage_queue_depth", "Items waiting in each inter-stage queue.", labels=["queue"])
        for name, q in (self.rt.queues or {}).items():
            depth.add_metric([name], q.qsize())
        yield depth
        yield GaugeMetricFamily("pipeline_messages_in_flight", "Messages received and not yet acked or released.",
                                value=len(self.rt.leases or ()))
        yield GaugeMetricFamily("pipeline_max_in_flight", "Cap on messages in flight (sqs.max_in_flight).",
                                value=self.rt.settings.sqs.max_in_flight)
        backlog = GaugeMetricFamily(
            "pipeline_sqs_backlog_messages",
            "The source queue's approximate messages by state, as of the last progress line.", labels=["state"])
        for state, n in sorted((getattr(self.rt, "backlog", None) or {}).items()):
            backlog.add_metric([state], n)
        yield backlog
        yield _histogram("pipeline_batch_size", "Messages per committed COPY batch.", s.batch_sizes)
        yield _histogram("pipeline_end_to_end_latency_seconds",
                         "Seconds from SQS SentTimestamp to the commit of the message's row.", s.latency)


def _histogram(name: str, doc: str, b: Buckets) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=b.cumulative(), sum_value=b.sum)


def registry_for(runtime: Any) -> CollectorRegistry:
    """A registry of one runtime's metrics (plus process metrics): one per pipeline, none global."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(runtime))
    ProcessCollector(registry=registry)
    return registry
