"""Prometheus view of what the pipeline did.

The stages bump plain counters (``stages.stats.Stats``); ``StatsCollector`` turns them into
Prometheus metrics only when scraped, so the hot path pays nothing for metrics.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from stages.stats import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS, Buckets, Stats

__all__ = ["Stats", "Buckets", "StatsCollector", "registry_for", "BATCH_SIZE_BUCKETS", "LATENCY_BUCKETS"]


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
            ("pipeline_copy_conflicts", s.copy_conflicts,
             "Direct COPY batches that met a stored key and were written again through the staged upsert."),
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
        refused = CounterMetricFamily(
            "pipeline_dead_letters_refused",
            "Dead letters SQS refused for good, by error code (the message stays on the source queue).", labels=["code"])
        for code, n in sorted(s.dead_letters_refused.items()):
            refused.add_metric([code], n)
        yield refused
        yield CounterMetricFamily("pipeline_dead_letter_retries_exhausted",
                                  "Dead letters given back after their transient-failure attempts ran out.",
                                  value=s.dead_letter_retries_exhausted)
        errors = CounterMetricFamily("pipeline_errors", "Failed calls to a dependency (retried).", labels=["dependency"])
        for dep in sorted({"sqs", "postgres", *s.errors}):
            errors.add_metric([dep], s.errors.get(dep, 0))
        yield errors
        outages = CounterMetricFamily("pipeline_dependency_outages",
                                      "Times a dependency stopped answering at all (calls then wait for a probe).",
                                      labels=["dependency"])
        down = GaugeMetricFamily("pipeline_dependency_unreachable",
                                 "1 while a dependency answers no call (one probe per backoff step goes).",
                                 labels=["dependency"])
        for dep in sorted({"sqs", "postgres", *s.outages}):
            outages.add_metric([dep], s.outages.get(dep, 0))
            down.add_metric([dep], 1 if dep in s.unreachable else 0)
        yield outages
        yield down

        depth = GaugeMetricFamily("pipeline_stage_queue_depth", "Items waiting in each inter-stage queue.", labels=["queue"])
        for name, q in (self.rt.queues or {}).items():
            depth.add_metric([name], q.qsize())
        yield depth
        yield GaugeMetricFamily("pipeline_messages_in_flight", "Messages received and not yet acked or released.",
                                value=len(self.rt.leases or ()))
        yield GaugeMetricFamily("pipeline_max_in_flight", "Cap on messages in flight (sqs.max_in_flight).",
                                value=self.rt.settings.sqs.max_in_flight)
        yield GaugeMetricFamily("pipeline_rows_in_flight", "Events carried by the messages in flight "
                                "(capped by pipeline.max_in_flight_rows).", value=getattr(self.rt.leases, "rows", 0))
        yield GaugeMetricFamily("pipeline_bytes_in_flight", "Bodies and decompressed payloads of the messages in flight "
                                "(capped by pipeline.max_in_flight_bytes).", value=getattr(self.rt.leases, "bytes", 0))
        backlog = GaugeMetricFamily(
            "pipeline_sqs_backlog_messages",
            "The source queue's approximate messages by state, as of the last progress line.", labels=["state"])
        for state, n in sorted((getattr(self.rt, "backlog", None) or {}).items()):
            backlog.add_metric([state], n)
        yield backlog
        conc = GaugeMetricFamily("pipeline_sqs_concurrency",
                                 "SQS calls allowed at once now, by operation (adaptive unless pinned).", labels=["op"])
        for op, n in sorted(s.concurrency.items()):
            conc.add_metric([op], n)
        yield conc
        rtt = HistogramMetricFamily("pipeline_sqs_rtt_seconds",
                                    "Round trip of SQS calls by operation (a receive's includes its long-poll wait).",
                                    labels=["op"])
        for op, b in s.rtt.items():
            rtt.add_metric([op], b.cumulative(), sum_value=b.sum)
        yield rtt
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
