"""Adaptive concurrency: how many SQS calls of one kind may be under way at once.

A fixed number of receivers or deleters is right for one round trip only. At loopback eight
receivers saturate the broker; at 50 ms they reach half of what one process can do, and the
deletes, capped at ``ackers × 10 / RTT`` messages a second, fill the in-flight cap and stall the
receivers behind them. So each kind of call (``ReceiveMessage``, ``DeleteMessageBatch``) gets a
``Limiter`` whose limit moves while the pipeline runs.

The loop is AIMD, in the spirit of Vector's Adaptive Request Concurrency (TCP congestion
control applied to requests: additive increase while the service keeps up, multiplicative
decrease on trouble) and of Lambda's SQS event source (pollers are added while messages keep
coming and removed on throttling or errors). It works in windows of a few round trips:

- **Trouble shrinks it at once**: a throttled or failed call cuts the limit by a quarter; a full
  downstream (the in-flight cap, a full queue to the transformer) by a fifth. Backpressure still
  stops polling by itself; the shrink only keeps the limit honest about what the pipeline absorbs.
- **It grows only where growth pays**: when every slot was busy for the window (there was
  demand for more), it tries a higher limit, and keeps it only if the throughput of the next
  window rose by a fair share of the step (Little's law: throughput = concurrency / RTT, so if
  the round trip grew as much as the concurrency, the extra calls only queue somewhere and cost
  CPU). A rejected step goes back, holds a few windows, and probes again later. Steps double
  until the first rejection or trouble (slow start), then grow by a quarter.
- **Idle, it drifts back** to its starting point (empty long polls carry no information).
- **Pinned** (a fixed number in the settings) it never moves.

RTTs and outcomes come from the caller (``observe``); the clock is injectable, so tests drive
it without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from . import events
from .stats import Stats

__all__ = ["Limiter", "tracked", "GROW_SHARE", "ERROR_DECREASE", "FULL_DECREASE"]

GROW_SHARE = 0.25  # a step up is kept if throughput rose by at least this share of the step's ratio
ERROR_DECREASE = 0.75  # throttling or a failed call: limit × this
FULL_DECREASE = 0.8  # the stages behind are full: limit × this
MIN_WINDOW_S = 0.25  # a window lasts at least this long ...
WINDOW_RTTS = 3  # ... and this many mean round trips
HOLD_WINDOWS = 3  # after a rejected step, wait this many windows before probing again
BUSY = 0.9  # share of the window all slots were in use, for the limit to count as the bottleneck


class Limiter:
    """A concurrency limit that adapts to what the calls it admits observe (or stays pinned).

    ``acquire``/``release`` admit calls like a semaphore whose size can change; ``observe``
    reports one finished call; ``congested`` reports that the stages behind had no room.
    ``on_change(limit, reason)`` is called on every move (gauges, logs).
    """

    def __init__(
        self, name: str, *, start: int, minimum: int = 1, maximum: int = 64, pinned: int | None = None,
        clock: Callable[[], float] = time.monotonic, on_change: Callable[[int, str], None] | None = None,
    ) -> None:
        self.name = name
        self.pinned = pinned
        if pinned is not None:
            minimum = maximum = start = pinned
        self.minimum, self.maximum = max(1, minimum), max(1, minimum, maximum)
        self.start = min(max(start, self.minimum), self.maximum)
        self.limit = self.start
        self.in_use = 0
        self._clock, self._on_change = clock, on_change
        self._waiters: deque[asyncio.Future] = deque()
        self._high = self.start  # the highest limit whose throughput held up: slow start climbs back to it
        self._slow_start = True
        self._probe: tuple[int, float] | None = None  # (limit before the step, its throughput)
        self._hold = 0
        self.rtt_ewma = 0.0
        self._new_window(self._clock())

    @property
    def adaptive(self) -> bool:
        return self.pinned is None

    # -- admission -------------------------------------------------------------------------

    async def acquire(self) -> None:
        if self.in_use < self.limit and not self._waiters:
            self._account()
            self.in_use += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._w_waited = True
        try:
            await fut  # ``_wake`` counts us in before it resolves the future
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            elif fut in self._waiters:  # ``_wake`` may have passed over it already
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self._account()
        self.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._account()
                self.in_use += 1
                fut.set_result(None)

    def _account(self) -> None:
        """Integrate busy time: ``in_use >= limit`` spans are when the limit was what held calls back."""
        now = self._clock()
        if self.in_use >= self.limit or self._waiters:
            self._w_busy += now - self._w_since
        self._w_since = now

    # -- feedback --------------------------------------------------------------------------

    def observe(self, rtt: float, items: int = 0, *, failed: bool = False) -> None:
        """One finished call: its round trip, the messages it moved, whether it failed or was throttled."""
        self._w_calls += 1
        self._w_rtt += rtt
        self._w_items += items
        if failed:
            self._w_failed += 1
        self.rtt_ewma = rtt if not self.rtt_ewma else 0.8 * self.rtt_ewma + 0.2 * rtt
        now = self._clock()
        elapsed = now - self._w_start
        if elapsed >= MIN_WINDOW_S and elapsed >= WINDOW_RTTS * self._w_rtt / self._w_calls:
            self._decide(now, elapsed)

    def congested(self) -> None:
        """The stages behind had no room for what these calls bring."""
        self._w_full = True

    def _new_window(self, now: float) -> None:
        self._w_start = self._w_since = now
        self._w_calls = self._w_items = self._w_failed = 0
        self._w_rtt = self._w_busy = 0.0
        self._w_full = self._w_waited = False

    def _decide(self, now: float, elapsed: float) -> None:
        self._account()
        busy = self._w_busy / elapsed
        rate = self._w_items / elapsed
        failed, full = self._w_failed, self._w_full
        self._new_window(now)
        if self.pinned is not None:
            return
        limit = self.limit
        if failed:
            self._back_off(int(limit * ERROR_DECREASE), "errors")
        elif full:
            self._back_off(int(limit * FULL_DECREASE), "downstream full")
        elif rate == 0:  # every call came back empty (idle long polls) or moved nothing
            self._probe = None
            if limit > self.start:
                self._set(max(self.start, limit // 2), "idle")
        elif busy < BUSY and self._probe is None:
            return  # demand is below the limit: nothing to learn
        elif self._probe is not None:
            before, before_rate = self._probe
            self._probe = None
            if rate > before_rate * (1 + GROW_SHARE * (limit / before - 1)):
                self._high = max(self._high, limit)
                self._step_up(rate, "throughput rose")
            else:
                self._slow_start = False
                self._hold = HOLD_WINDOWS
                self._set(before, "no gain")
        elif self._hold:
            self._hold -= 1
        else:
            self._step_up(rate, "probe")

    def _step_up(self, rate: float, reason: str) -> None:
        limit = self.limit
        if limit >= self.maximum:
            return
        doubling = self._slow_start or limit * 2 <= self._high
        step = limit if doubling else max(1, limit // 4)
        self._probe = (limit, rate)
        self._set(min(self.maximum, limit + step), reason)

    def _back_off(self, target: int, reason: str) -> None:
        self._probe = None
        self._slow_start = False
        self._hold = HOLD_WINDOWS
        self._set(max(self.minimum, min(target, self.limit - 1)), reason)

    def _set(self, limit: int, reason: str) -> None:
        limit = min(max(limit, self.minimum), self.maximum)
        if limit == self.limit:
            return
        self._account()
        self.limit = limit
        self._wake()
        if self._on_change is not None:
            self._on_change(limit, reason)


def tracked(op: str, stats: Stats, limit: int | Limiter) -> Limiter:
    """``limit`` as a Limiter whose moves show in ``stats.concurrency[op]`` (a plain number: pinned)."""
    lim = limit if isinstance(limit, Limiter) else Limiter(op, start=limit, pinned=limit)
    lim._on_change = lambda n, why: events.concurrency_changed(stats, op, n, why)
    stats.concurrency[op] = lim.limit
    return lim
