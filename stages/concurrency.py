"""Adaptive concurrency: how many SQS calls of one kind may be under way at once.

A fixed number of receivers or deleters is right for one round trip only. At loopback eight
receivers saturate the broker; at 50 ms they reach half of what one process can do, and the
deletes, capped at ``ackers × 10 / RTT`` messages a second, fill the in-flight cap and stall the
receivers behind them. So each kind of call (``ReceiveMessage``, ``DeleteMessageBatch``) gets a
``Limiter`` whose limit moves while the pipeline runs.

The loop follows demand, as Lambda's SQS event source scales its pollers (more while messages
keep coming, fewer on throttling and errors), with AIMD for trouble as in Vector's Adaptive
Request Concurrency. It decides once per window of at least ``MIN_WINDOW_S`` and
``WINDOW_RTTS`` mean round trips:

- **Trouble cuts it at once**: a throttled or failed call × ``ERROR_DECREASE``; a full downstream
  (the in-flight cap, a full queue to the transformer) × ``FULL_DECREASE``. Backpressure still
  stops polling by itself; the cut only keeps the limit honest about what the pipeline absorbs.
- **Demand grows it fast**: when calls waited for a permit (or every permit was busy) and, for
  calls with a natural size (receives: 10 messages), the calls came back nearly full, the limit
  doubles each window, up to the limit at which trouble last showed; past that it grows by a
  quarter a window. Growth that would not fit downstream (``room``) is not taken. A full call
  is the only signal that more calls would find more messages.
- **Growth must pay** (Little's law): with every permit in use, a window delivers about
  ``limit / mean RTT`` calls a second, so a step from ``L0`` to ``L1`` pays only if the round
  trip did not rise with it. The window after each step checks it: if the mean RTT rose by
  more than ``(L1/L0) / (1 + GAIN × (L1/L0 - 1))`` (the step bought less than ``GAIN`` of the
  throughput it promised) while calls queue (the RTT is over ``HEADROOM`` × the base RTT
  below: the broker or our own event loop is saturated, as at loopback), the limit goes back
  to ``L0`` and stays at or below it for ``HOLD_S`` before it probes again. At a network round
  trip the RTT hardly moves with concurrency and the ramp is unchanged; a saturated machine
  at 50 ms (RTT up by half) still grows, as a client with more calls in flight there gets a
  larger share of a broker others use too.
  Nor does it grow past what Little's law says the demand needs: ``HEADROOM`` × the calls
  asked for per second × the base RTT (the lowest window mean, which creeps up by
  ``BASE_DRIFT`` a window so that a slower network is learnt). For receives, whose callers ask
  again as soon as a call ends, that is TCP Vegas' test: no growth while the RTT is over
  ``HEADROOM`` × the base (calls already queue somewhere). For deletes it bounds bursts: a
  commit of 2,000 rows asks for 200 calls at once, which at loopback are served as fast by 10
  permits as by 128, and 128 deletes in flight on a saturated broker only starve the receives.
  A limit that ``follows`` another (deletes follow receives: they carry the same messages, so
  as many calls in flight keep up at the same RTT) may always grow up to that one's limit.
  Mean RTTs, not the throughput of one window against the next: a window's throughput also
  moves with stalls downstream (a receiver waiting for the transformer holds no permit) and
  is too noisy on a shared machine to steer by; the mean of a window's round trips is not.
- **Slack lets it drift down slowly**: empty windows (idle long polls) halve it, partial calls or
  permits sitting idle (never half of them in use) take a tenth off, never below the start.
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

__all__ = ["Limiter", "tracked", "ERROR_DECREASE", "FULL_DECREASE"]

ERROR_DECREASE = 0.75  # throttling or a failed call: limit × this
FULL_DECREASE = 0.8  # the stages behind are full: limit × this
DRIFT = 0.9  # slack (partial calls, idle permits): limit × this, not below the start
GROW_FILL = 0.7  # calls that bring this share of their size on average: there is more to fetch
SLACK_FILL = 0.3  # ... below this share: fewer calls would do
MIN_WINDOW_S = 0.1  # a window lasts at least this long ...
WINDOW_RTTS = 1  # ... and a mean round trip (calls started at a new limit report within one)
BUSY = 0.9  # share of the window all permits were in use, for demand to count without a waiter
GAIN = 0.15  # a growth step must deliver this share of the throughput it promised (by Little's law)
HOLD_S = 2.0  # after a step that did not pay, no growth past its start for this long
HEADROOM = 3.0  # growth stops at this × calls asked for per second × base RTT (Little's law)
BASE_DRIFT = 1.0005  # the base RTT (lowest window mean) rises by this a window unless a window undercuts it


class Limiter:
    """A concurrency limit that follows demand and backs off on trouble (or stays pinned).

    ``acquire``/``release`` admit calls like a semaphore whose size can change; ``observe``
    reports one finished call; ``congested`` reports that the stages behind had no room.
    ``call_size`` is what a call brings when there is more to fetch (10 for receives; 0: calls
    have no natural size, demand is permits waited for). ``room(limit)`` says whether the stages
    behind could take what ``limit`` calls bring. ``on_change(limit, reason)`` is called on every
    move (gauges, logs).
    """

    def __init__(
        self, name: str, *, start: int, minimum: int = 1, maximum: int = 64, pinned: int | None = None,
        clock: Callable[[], float] = time.monotonic, on_change: Callable[[int, str], None] | None = None,
        call_size: int = 0, room: Callable[[int], bool] | None = None,
    ) -> None:
        self.name = name
        self.pinned = pinned
        if pinned is not None:
            minimum = maximum = start = pinned
        self.minimum, self.maximum = max(1, minimum), max(1, minimum, maximum)
        self.start = min(max(start, self.minimum), self.maximum)
        self.limit = self.start
        self.in_use = 0
        self.call_size, self.room = call_size, room
        self._clock, self._on_change = clock, on_change
        self._waiters: deque[asyncio.Future] = deque()
        self._fast_until = self.maximum  # doubling up to here: the limit where trouble last showed
        self._probe: tuple[int, float] | None = None  # the last growth step: (limit before it, mean RTT there)
        self._plateau, self._plateau_until = self.maximum, 0.0  # no growth past this until then
        self.base_rtt = 0.0  # the lowest window mean RTT, creeping up (``BASE_DRIFT``)
        self.follows: Limiter | None = None  # demand may always grow this one up to that one's limit
        self.rtt_ewma = 0.0
        self._new_window(self._clock())

    @property
    def adaptive(self) -> bool:
        return self.pinned is None

    # -- admission -------------------------------------------------------------------------

    async def acquire(self) -> None:
        self._w_asked += 1
        if self.in_use < self.limit and not self._waiters:
            self._account()
            self.in_use += 1
            if self.in_use > self._w_peak:
                self._w_peak = self.in_use
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
                if self.in_use > self._w_peak:
                    self._w_peak = self.in_use
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
        self._w_items += items
        if failed:
            self._w_failed += 1
        self.rtt_ewma = rtt if not self.rtt_ewma else 0.8 * self.rtt_ewma + 0.2 * rtt
        now = self._clock()
        # A window's round trip is that of the calls it started: a call begun under the previous
        # limit would make a step that did not pay look as if it had.
        if now - rtt >= self._w_start - 1e-6:
            self._w_timed += 1
            self._w_rtt += rtt
        elapsed = now - self._w_start
        if self._w_timed and elapsed >= MIN_WINDOW_S and elapsed >= WINDOW_RTTS * self._w_rtt / self._w_timed:
            self._decide(now, elapsed)

    def congested(self) -> None:
        """The stages behind had no room for what these calls bring."""
        self._w_full = True

    def _new_window(self, now: float) -> None:
        self._w_start = self._w_since = now
        self._w_calls = self._w_timed = self._w_items = self._w_failed = self._w_asked = 0
        self._w_peak = self.in_use
        self._w_rtt = self._w_busy = 0.0
        self._w_full = self._w_waited = False

    def _decide(self, now: float, elapsed: float) -> None:
        self._account()
        demand = self._w_waited or self._w_busy >= BUSY * elapsed
        calls, items, peak = self._w_calls, self._w_items, self._w_peak
        failed, full, rtt = self._w_failed, self._w_full, self._w_rtt / self._w_timed
        asked = self._w_asked / elapsed  # calls asked for per second (admitted or waiting)
        self._new_window(now)
        if self.pinned is not None:
            return
        limit, probe, self._probe = self.limit, self._probe, None
        base = self.base_rtt = min(self.base_rtt * BASE_DRIFT, rtt) if self.base_rtt else rtt
        needed = HEADROOM * asked * base  # Little's law: permits that demand keeps busy at the base RTT
        if self.follows is not None:
            needed = max(needed, self.follows.limit)
        fill = items / (calls * self.call_size) if self.call_size else 1.0
        if failed:
            self._cut(int(limit * ERROR_DECREASE), "errors")
        elif full:
            self._cut(int(limit * FULL_DECREASE), "downstream full")
        elif probe is not None and rtt > HEADROOM * base and not _paid(probe[0], limit, probe[1], rtt):
            self._plateau, self._plateau_until = probe[0], now + HOLD_S
            self._set(probe[0], "no gain")
        elif items == 0:  # every call came back empty (idle long polls) or moved nothing
            if limit > self.start:
                self._set(max(self.start, limit // 2), "idle")
        elif fill < SLACK_FILL or (not demand and peak * 2 <= limit):  # partial calls, or permits sat idle
            if limit > self.start:
                self._set(max(self.start, int(limit * DRIFT)), "slack")
        elif demand and fill >= GROW_FILL and limit < self.maximum and limit < needed:
            target = limit * 2 if limit * 2 <= self._fast_until else limit + max(1, limit // 4)
            target = min(target, self.maximum if now >= self._plateau_until else self._plateau)
            if target > limit and (self.room is None or self.room(target)):
                if self.follows is None or target > self.follows.limit:  # up to the followed limit needs no proof
                    self._probe = (limit, rtt)
                self._set(target, "demand")

    def _cut(self, target: int, reason: str) -> None:
        """Multiplicative decrease; fast growth later only climbs back to where the trouble showed."""
        self._fast_until = max(self.limit, self.minimum)
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


def _paid(before: int, after: int, rtt_before: float, rtt_after: float) -> bool:
    """Whether growing from ``before`` to ``after`` permits raised throughput by at least ``GAIN`` of the step.

    With every permit in use, throughput is ``limit / RTT`` (Little's law): the step pays if the
    round trip rose less than the concurrency did, discounted by ``GAIN``.
    """
    if after <= before or rtt_before <= 0:
        return True
    step = after / before
    return rtt_after <= rtt_before * step / (1 + GAIN * (step - 1))


def tracked(op: str, stats: Stats, limit: int | Limiter) -> Limiter:
    """``limit`` as a Limiter whose moves show in ``stats.concurrency[op]`` (a plain number: pinned)."""
    lim = limit if isinstance(limit, Limiter) else Limiter(op, start=limit, pinned=limit)
    lim._on_change = lambda n, why: events.concurrency_changed(stats, op, n, why)
    stats.concurrency[op] = lim.limit
    return lim
