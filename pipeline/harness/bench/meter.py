"""Measuring a phase: CPU time, RSS samples and events, in the process that does the work.

Throughput is counted between the first and the last event, so process start-up and the
final idle poll do not count; a followed pipeline's window runs from its first commit to its
last delete. Several workers' measurements merge on one clock.

The pipeline is observed only through what ``/metrics`` exposes, its ``Stats``: commits are the
growth of the batch-size histogram's sum, sampled every ``COMMIT_SAMPLE_S``, and latency is the
SentTimestamp-to-commit histogram. The product has no benchmark hook, so what is measured is
what is monitored. Latency is therefore as fine as the histogram's buckets: percentiles
interpolate linearly within a bucket, as Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import array
import asyncio
import multiprocessing
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from stages.stats import Buckets, Stats

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

__all__ = ["Meter", "rate", "percentiles", "spread", "merge", "COMMIT_SAMPLE_S"]

COMMIT_SAMPLE_S = 0.01  # fine enough for a first-to-last window, cheap next to the work measured


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    """This process's CPU, its finished children's, and its live ones' (the pipeline's transform workers)."""
    live = multiprocessing.active_children()  # first: it reaps the finished ones, whose CPU RUSAGE_CHILDREN then holds
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + sum(map(_live_cpu, live))


def _live_cpu(proc: Any) -> float:
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError, TypeError):  # gone meanwhile (then counted as reaped), or not Linux
        return 0.0


@dataclass
class Meter:
    """Events ``(t, n)`` of one phase, its CPU time and sampled RSS (plus the counter over time)."""

    counter: Callable[[], int] = lambda: 0
    events: list[tuple[float, int]] = field(default_factory=list)
    latencies_ms: array.array = field(default_factory=lambda: array.array("d"))
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, counter)
    # (t, receive, delete): the adaptive limits over time, as /metrics shows them (pipeline_sqs_concurrency)
    concurrency: list[tuple[float, int, int]] = field(default_factory=list)
    cpu_first: float | None = None  # CPU time at the first event ...
    cpu_last: float = 0.0  # ... and at the last: the drain's own CPU, without start-up and the idle tail
    # A followed pipeline's window ends at its last delete, not its last commit: (t, CPU) then.
    last_ack: tuple[float, float] | None = None
    _acked: int = 0
    t0: float = 0.0
    work: float | None = None  # when the first message was in hand (the fallback window's start)
    cpu0: float = 0.0
    cpu1: float = 0.0
    stats: Stats | None = None  # followed: commits as events, and the latency histogram
    latency: bool = False
    _committed: int = 0
    _latency0: list[int] = field(default_factory=list)
    _task: asyncio.Task | None = None
    _follower: asyncio.Task | None = None

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = _cpu_seconds()
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            t = time.monotonic() - self.t0
            self.rss.append((t, _rss_bytes(), self.counter()))
            if self.stats is not None and self.stats.concurrency:
                c = self.stats.concurrency
                self.concurrency.append((t, c.get("receive", 0), c.get("delete", 0)))
            await asyncio.sleep(0.1)

    def event(self, n: int) -> None:
        self.events.append((time.monotonic() - self.t0, n))
        self.cpu_last = _cpu_seconds()
        if self.cpu_first is None:
            self.cpu_first = self.cpu_last

    def working(self) -> None:
        if self.work is None:
            self.work = time.monotonic() - self.t0

    def follow(self, stats: Stats, *, latency: bool = True) -> None:
        """Count ``stats``' commits as events from now on (and, with ``latency``, report its latency histogram)."""
        self.stats, self.latency = stats, latency
        self._committed = int(stats.batch_sizes.sum)
        self._acked = self.counter()
        self._latency0 = list(stats.latency.counts)
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_SAMPLE_S)
            self._commits()
            acked = self.counter()
            if acked > self._acked:
                self._acked = acked
                self.last_ack = (time.monotonic() - self.t0, _cpu_seconds())

    def _commits(self) -> None:
        """Messages committed since the last look: ``observe_commit`` adds each batch's size to the sum."""
        assert self.stats is not None
        now = int(self.stats.batch_sizes.sum)
        if now > self._committed:
            self.event(now - self._committed)
            self._committed = now

    async def stop(self) -> dict:
        self.cpu1 = _cpu_seconds()
        for task in (self._task, self._follower):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.stats is not None:
            self._commits()
            if self.latency:  # what this phase added to the histogram
                since = Buckets(self.stats.latency.bounds)
                since.counts = [n - n0 for n, n0 in zip(self.stats.latency.counts, self._latency0)]
                self.latencies_ms = spread(since)
        self.rss.append((time.monotonic() - self.t0, _rss_bytes(), self.counter()))
        return self.result()

    def result(self) -> dict:
        ev = self.events
        if self.last_ack is not None and len(ev) >= 3 and self.last_ack[0] > ev[-1][0]:
            # first commit to last delete: the drain is over when SQS has forgotten the messages
            ev = [*ev, (self.last_ack[0], 0)]
            self.cpu_last = self.last_ack[1]
        n, window, per_s = rate(ev, self.work)
        cpu = self.cpu1 - self.cpu0
        drained = n - ev[0][1] if len(ev) >= 2 else 0  # messages after the first event, as ``rate`` counts them
        drain_cpu = self.cpu_last - self.cpu_first if self.cpu_first is not None else 0.0
        return {
            "t0": self.t0,
            "work": self.work,
            "messages": n,
            "seconds": round(window, 3),
            "rate_per_s": round(per_s, 1),
            "cpu_s": round(cpu, 3),
            "cpu_s_per_10k": round(cpu / n * 10_000, 3) if n else None,
            "drain_cpu_s_per_10k": round(drain_cpu / drained * 10_000, 3) if drained else None,
            "peak_rss_mb": round(max((r for _, r, _ in self.rss), default=_rss_bytes()) / 2**20, 1),
            "concurrency": [(round(t, 2), r, d) for t, r, d in self.concurrency],
            "latency_ms": percentiles(self.latencies_ms),
            "events": [(round(t, 3), k) for t, k in ev],
            "rss": [(round(t, 2), round(r / 2**20, 1), c) for t, r, c in self.rss],
            "latencies_ms": self.latencies_ms.tolist(),
        }


def rate(ev: list[tuple[float, int]], work: float | None) -> tuple[int, float, float]:
    """Messages, window and rate: first event to last, so start-up and the last idle poll do not count.

    With fewer than three events (small runs, one or two batches) the window starts when the
    first message was in hand instead.
    """
    n = sum(k for _, k in ev)
    if len(ev) >= 3:
        window = ev[-1][0] - ev[0][0]
        return n, window, (n - ev[0][1]) / window if window > 0 else 0.0
    if ev and work is not None:
        window = ev[-1][0] - work
        return n, window, n / window if window > 0 else 0.0
    return n, 0.0, 0.0


def percentiles(values: array.array | list[float]) -> dict | None:
    if not values:
        return None
    s = sorted(values)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))], 1)

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "max": round(s[-1], 1), "n": len(s)}


def spread(hist: Buckets) -> array.array:
    """A seconds histogram as values in ms, each bucket's observations spread evenly across it.

    Percentiles and the CDF of these values are the linear interpolation ``histogram_quantile``
    makes; the +Inf bucket has no width, so its observations sit at the last bound.
    """
    out = array.array("d")
    low = 0.0
    for high, n in zip((*hist.bounds, hist.bounds[-1]), hist.counts):
        step = (high - low) / n if n else 0.0
        out.extend(1000 * (low + step * (i + 0.5)) for i in range(n))
        low = high
    return out


def merge(results: list[dict]) -> dict:
    """Workers' results as one, their events on one clock (``time.monotonic`` is system-wide)."""
    base = min(r["t0"] for r in results)
    events = sorted((round(t + r["t0"] - base, 3), k) for r in results for t, k in r["events"])
    works = [r["work"] + r["t0"] - base for r in results if r["work"] is not None]
    lat = [x for r in results for x in r["latencies_ms"]]
    n, window, per_s = rate(events, min(works) if works else None)
    cpu = sum(r["cpu_s"] for r in results)
    return {
        "t0": base, "work": min(works) if works else None,
        "messages": n, "seconds": round(window, 3), "rate_per_s": round(per_s, 1),
        "cpu_s": round(cpu, 3), "cpu_s_per_10k": round(cpu / n * 10_000, 3) if n else None,
        "peak_rss_mb": round(sum(r["peak_rss_mb"] for r in results), 1),
        "latency_ms": percentiles(lat), "events": events, "rss": results[0]["rss"], "latencies_ms": lat,
        "workers": [{k: r[k] for k in ("messages", "rate_per_s", "cpu_s", "peak_rss_mb")} for r in results],
    }
