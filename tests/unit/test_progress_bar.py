"""The progress bar's arithmetic agrees with the summary: it counts acked messages, its total never
overshoots the real work, and its rate is the summary's (rows inserted per second)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from pipeline.console import BarMath, _detail, print_summary


def test_total_is_unknown_until_the_first_backlog_snapshot() -> None:
    bar = BarMath(started=0.0)
    assert bar.total(0, {}) is None
    assert bar.total(40, {}) is None


def test_a_stale_snapshot_does_not_count_messages_acked_since_twice() -> None:
    # 1,000 messages in all. Refresh 1 sees 100 acked; SQS is asked right after, at 120 acked, and
    # answers 880 left; refresh 2 sees that answer with 150 acked already.
    bar = BarMath(started=0.0)
    assert bar.total(100, {}) is None
    first = {"visible": 700, "in_flight": 180, "delayed": 0}  # the runner stores a new dict per answer
    assert bar.total(150, first) == 980 <= 1000  # acked as of refresh 1 + backlog: never 150 + 880 = 1,030
    assert bar.total(985, first) == 985  # the same answer again: no new estimate, never below what is done
    last = {"visible": 0, "in_flight": 10, "delayed": 0}  # asked at 990 acked: 10 left
    assert bar.total(990, last) == 985 + 10 <= 1000
    assert bar.total(1000, last) == 1000


def test_total_never_falls_below_what_is_done() -> None:
    bar = BarMath(started=0.0)
    bar.total(10, {})
    assert bar.total(500, {"visible": 0, "in_flight": 0, "delayed": 0}) == 500  # drained: total = acked


def test_the_bar_rate_is_rows_per_second_and_ends_at_the_summary_rate() -> None:
    bar = BarMath(started=100.0)
    assert bar.rows_per_s(0, 100.5) == 0.0  # less than a window: unchanged
    assert bar.rows_per_s(300, 101.0) == 300.0
    assert bar.rows_per_s(500, 102.0) == 200.0
    # the final frame uses what Stats.summary computes: rate_per_s = inserted / elapsed
    assert bar.average(500, 104.0) == 125.0
    stats = SimpleNamespace(inserted=500, duplicates=2, rejected=3)
    assert _detail(stats, 125.0, 0).endswith("125 rows/s")
    assert "1 worker restarts" in _detail(stats, 125.0, 1)


def test_the_summary_table_labels_the_same_rate() -> None:
    out = io.StringIO()
    print_summary({"inserted": 500, "acked": 505, "elapsed_s": 4.0, "rate_per_s": 125.0, "worker_restarts": 1}, out)
    text = out.getvalue()
    assert "125.0 rows/s" in text and "worker restarts" in text
