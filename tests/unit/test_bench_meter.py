"""bench observes a run only through ``Stats``, what ``/metrics`` exposes (no hook in the product)."""

from __future__ import annotations

import asyncio
import inspect
import time

from pipeline.harness.bench.meter import Meter, percentiles, spread
from pipeline.runner import run
from stages.sink import CopySink
from stages.stats import Buckets, Stats


def test_the_product_has_no_benchmark_hook() -> None:
    assert "observe_latency" not in inspect.signature(run).parameters
    assert "observe_latency" not in inspect.signature(CopySink).parameters


def test_spread_interpolates_within_buckets() -> None:
    hist = Buckets((0.1, 0.2, 1.0))
    for v in [0.05] * 50 + [0.15] * 40 + [0.5] * 9 + [7.0]:
        hist.observe(v)
    values = spread(hist)
    assert len(values) == 100 and all(0 < v <= 1000 for v in values)
    p = percentiles(values)
    assert p is not None and 0 < p["p50"] <= 200 and 100 <= p["p95"] <= 1000 and p["max"] == 1000.0
    assert spread(Buckets((0.1,))).tolist() == []


async def test_meter_counts_commits_and_latency_from_stats() -> None:
    stats = Stats()
    stats.observe_commit([{"Attributes": {"SentTimestamp": "0"}}])  # before the phase: not counted
    meter = Meter(counter=lambda: stats.acked)
    meter.start()
    meter.follow(stats)
    now_ms = str(int(time.time() * 1000) - 300)
    for _ in range(3):
        stats.observe_commit([{"Attributes": {"SentTimestamp": now_ms}}] * 10)
        await asyncio.sleep(0.03)
    result = await meter.stop()
    assert result["messages"] == 30 and len(result["events"]) == 3
    assert result["latency_ms"] is not None and result["latency_ms"]["n"] == 30  # the histogram's growth

    quiet = Meter()
    quiet.start()
    quiet.follow(stats, latency=False)
    stats.observe_commit([{"Attributes": {"SentTimestamp": now_ms}}] * 5)
    result = await quiet.stop()
    assert result["messages"] == 5 and result["latency_ms"] is None


async def test_a_followed_pipeline_drains_until_its_last_delete() -> None:
    # CASE: commits stop, deletes go on: the window (and its CPU) ends at the last delete, not the last commit
    stats = Stats()
    meter = Meter(counter=lambda: stats.acked)
    meter.start()
    meter.follow(stats, latency=False)
    for _ in range(3):
        stats.observe_commit([{"Attributes": {"SentTimestamp": "0"}}] * 10)
        await asyncio.sleep(0.03)
    last_commit = meter.events[-1][0]
    for _ in range(3):
        stats.acked += 10
        await asyncio.sleep(0.03)
    result = await meter.stop()
    assert result["messages"] == 30
    assert result["events"][-1][0] > last_commit + 0.05 and result["events"][-1][1] == 0
    assert result["seconds"] > last_commit - result["events"][0][0]
