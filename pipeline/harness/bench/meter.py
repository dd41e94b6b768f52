"""Measuring a phase: CPU time, RSS samples and events, in the process that does the work.

Throughput is counted between the first and the last event, so process start-up and the
final idle poll do not count; several workers' measurements merge on one clock.
"""

from __future__ import annotations

import array
import asyncio
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Meter", "rate", "percentiles", "merge"]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Meter:
    """Events ``(t, n)`` of one phase, its CPU time and sampled RSS (plus the counter over time)."""

    counter: Callable[[], int] = lambda: 0
    events: list[tuple[float, int]] = field(default_factory=list)
    latencies_ms: array.array = field(default_factory=lambda: array.array("d"))
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, counter)
    t0: float = 0.0
    work: float | None = None  # when the first message was in hand (the fallback window's start)
    cpu0: float = 0.0
    cpu1: float = 0.0
    _task: asyncio.Task | None = None

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = _cpu_seconds()
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.rss.append((time.monotonic() - self.t0, _rss_bytes(), self.counter()))
            await asyncio.sleep(0.1)

    def event(self, n: int) -> None:
        self.events.append((time.monotonic() - self.t0, n))

    def working(self) -> None:
        if self.work is None:
            self.work = time.monotonic() - self.t0

    def observe(self, msgs: list[dict]) -> None:
        """``CopySink.observe_latency`` hook: called once per committed batch."""
        self.events.append((time.monotonic() - self.t0, len(msgs)))
        now_ms = time.time() * 1000
        add = self.latencies_ms.append
        for m in msgs:
            add(now_ms - int(m["Attributes"]["SentTimestamp"]))

    async def stop(self) -> dict:
        self.cpu1 = _cpu_seconds()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.rss.append((time.monotonic() - self.t0, _rss_bytes(), self.counter()))
        return self.result()

    def result(self) -> dict:
        ev = self.events
        n, window, per_s = rate(ev, self.work)
        cpu = self.cpu1 - self.cpu0
        return {
            "t0": self.t0,
            "work": self.work,
            "messages": n,
            "seconds": round(window, 3),
            "rate_per_s": round(per_s, 1),
            "cpu_s": round(cpu, 3),
            "cpu_s_per_10k": round(cpu / n * 10_000, 3) if n else None,
            "peak_rss_mb": round(max((r for _, r, _ in self.rss), default=_rss_bytes()) / 2**20, 1),
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
