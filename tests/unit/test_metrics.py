"""Stats → Prometheus at scrape time; histograms as plain bucket counts; per-runtime registries."""

from __future__ import annotations

import asyncio
import io
import time
from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.console import interactive, print_summary
from pipeline.metrics import Buckets, Stats, registry_for


def runtime(stats: Stats) -> SimpleNamespace:
    queues = {"raw": asyncio.Queue(), "rows": asyncio.Queue(), "acks": asyncio.Queue()}
    queues["rows"].put_nowait(("batch",))
    return SimpleNamespace(stats=stats, queues=queues, leases={"h1": 0.0, "h2": 0.0}, backlog={"visible": 7, "in_flight": 2},
                           settings=SimpleNamespace(sqs=SimpleNamespace(max_in_flight=500)))


def samples(registry) -> dict[str, float]:  # type: ignore[no-untyped-def]
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_buckets_are_le_and_cumulative() -> None:
    b = Buckets((1, 10))
    for v in (0.5, 1, 2, 10, 11):
        b.observe(v)
    assert b.cumulative() == [("1.0", 2), ("10.0", 4), ("+Inf", 5)]
    assert (b.count, b.sum) == (5, 24.5)


def test_collector_reads_stats_at_scrape_time() -> None:
    stats = Stats()
    reg = registry_for(runtime(stats))
    assert samples(reg)["pipeline_rows_inserted_total"] == 0
    stats.received, stats.inserted, stats.duplicates, stats.acked, stats.ack_failures = 12, 9, 1, 11, 2
    stats.rejected_by_rule.update({"ip.invalid": 2})
    stats.errors["sqs"] += 3
    now_ms = int(time.time() * 1000)
    stats.observe_commit([{"Attributes": {"SentTimestamp": str(now_ms - 2000)}} for _ in range(10)])
    got = samples(reg)
    assert got["pipeline_messages_received_total"] == 12 and got["pipeline_rows_inserted_total"] == 9
    assert got["pipeline_duplicates_total"] == 1 and got["pipeline_messages_acked_total"] == 11
    assert got["pipeline_ack_failures_total"] == 2
    assert got["pipeline_messages_rejected_total{rule=ip.invalid}"] == 2
    assert got["pipeline_errors_total{dependency=sqs}"] == 3 and got["pipeline_errors_total{dependency=postgres}"] == 0
    assert got["pipeline_stage_queue_depth{queue=rows}"] == 1 and got["pipeline_stage_queue_depth{queue=raw}"] == 0
    assert got["pipeline_messages_in_flight"] == 2 and got["pipeline_max_in_flight"] == 500
    assert got["pipeline_sqs_backlog_messages{state=visible}"] == 7
    assert got["pipeline_batch_size_count"] == 1 and got["pipeline_batch_size_sum"] == 10
    assert got["pipeline_batch_size_bucket{le=10.0}"] == 1 and got["pipeline_batch_size_bucket{le=1.0}"] == 0
    assert got["pipeline_end_to_end_latency_seconds_count"] == 10
    assert got["pipeline_end_to_end_latency_seconds_bucket{le=1.0}"] == 0
    assert got["pipeline_end_to_end_latency_seconds_bucket{le=2.5}"] == 10
    assert 19 < got["pipeline_end_to_end_latency_seconds_sum"] < 30


def test_each_runtime_has_its_own_registry() -> None:
    a, b = Stats(), Stats()
    ra, rb = registry_for(runtime(a)), registry_for(runtime(b))
    a.inserted = 5
    assert samples(ra)["pipeline_rows_inserted_total"] == 5 and samples(rb)["pipeline_rows_inserted_total"] == 0


def test_messages_without_sent_timestamp_count_in_batches_only() -> None:
    stats = Stats()
    stats.observe_commit([{"Attributes": {}}, {}])
    assert (stats.batch_sizes.count, stats.latency.count) == (1, 0)


def test_summary_table_and_no_bar_off_a_terminal() -> None:
    assert not interactive(io.StringIO())
    out = io.StringIO()
    summary = Stats(received=3, inserted=2, rejected=1, acked=3).summary()
    summary["rejected_by_rule"] = {"ip.invalid": 1}
    print_summary(summary, out)
    text = out.getvalue()
    assert "inserted (rows written)" in text and "ip.invalid" in text and "rows/s" in text
