"""The benchmark's arithmetic and the workers' summary merge (no services)."""

from __future__ import annotations

from pipeline.harness.bench.meter import percentiles as _percentiles
from pipeline.harness.bench.meter import rate as _rate
from pipeline.harness.bench.report import buckets as _buckets
from pipeline.workers import merge_summaries


def test_rate_counts_from_the_first_event_to_the_last() -> None:
    n, window, rate = _rate([(1.0, 100), (2.0, 100), (3.0, 100)], work=0.0)
    assert (n, window, rate) == (300, 2.0, 100.0)  # the first batch opens the window, it does not count
    n, window, rate = _rate([(1.5, 100)], work=0.5)  # one batch: from the first message in hand
    assert (n, window, rate) == (100, 1.0, 100.0)
    assert _rate([], None) == (0, 0.0, 0.0)


def test_percentiles_and_buckets() -> None:
    p = _percentiles([float(i) for i in range(1, 101)])
    assert p is not None and (p["p50"], p["p95"], p["p99"], p["max"], p["n"]) == (51.0, 96.0, 100.0, 100.0, 100)
    assert _percentiles([]) is None
    series = _buckets([(0.0, 10), (0.5, 10), (1.0, 10)])
    assert series[0][0] == 0.0 and sum(v for _, v in series) > 0


def test_merge_summaries_sums_counts_and_rules() -> None:
    a = {"received": 10, "inserted": 8, "rejected": 2, "rejected_by_rule": {"ip.invalid": 2}, "errors": {},
         "elapsed_s": 2.0, "rate_per_s": 4.0}
    b = {"received": 5, "inserted": 5, "rejected": 0, "rejected_by_rule": {}, "errors": {"sqs": 1},
         "elapsed_s": 2.5, "rate_per_s": 2.0}
    m = merge_summaries([a, b])
    assert (m["received"], m["inserted"], m["rejected"], m["processes"]) == (15, 13, 2, 2)
    assert m["rejected_by_rule"] == {"ip.invalid": 2} and m["errors"] == {"sqs": 1}
    assert m["elapsed_s"] == 2.5 and m["rate_per_s"] == 5.2
