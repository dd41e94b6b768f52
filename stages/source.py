"""SQS source: concurrent long-poll receivers feeding one bounded queue.

How many receive calls run at once is a ``Limiter`` (adaptive by default, see
``stages.concurrency``): receivers up to its maximum wait for a permit, and each permit is one
call under way. Backpressure is two-fold: a receiver reserves room under the in-flight cap
before it polls, and ``put`` on the bounded queue blocks while the transformer is behind.
Either way a full pipeline stops polling instead of buffering without bound, and tells the
limiter, which then shrinks; full receive calls with room behind them make it grow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from . import backoff, events
from .concurrency import Limiter, tracked
from .leases import Leases
from .message import RECEIVED_ATTRIBUTES
from .outage import Outage
from .sqs import RETRYABLE, classify, unanswered
from .stats import Stats

__all__ = ["SqsSource"]

log = logging.getLogger("pipeline.source")


class SqsSource:
    def __init__(
        self, client: Any, queue_url: str, outbox: asyncio.Queue, leases: Leases, stats: Stats, *,
        receivers: int | Limiter, wait_time_seconds: int, visibility_timeout: int = 0, outage: Outage | None = None,
    ) -> None:
        self.client, self.queue_url, self.outbox = client, queue_url, outbox
        self.leases, self.stats = leases, stats
        # Shared with the acker in a run: one outage, one backoff.
        self.outage = outage or Outage("sqs", stats, unanswered=unanswered)
        self.limit = tracked("receive", stats, receivers)  # a plain number: pinned
        # A full call (10 messages) says there is more to fetch; the limit grows only while what
        # its calls would bring still fits under the in-flight cap next to what is held.
        self.limit.call_size = 10
        self.limit.room = lambda n: len(leases) + 10 * n <= leases.max_in_flight
        self._request: dict[str, Any] = {
            "QueueUrl": queue_url,
            "MaxNumberOfMessages": 10,
            "WaitTimeSeconds": wait_time_seconds,
            # MessageGroupId: a FIFO message's dead letter keeps its group (absent on standard queues).
            "MessageSystemAttributeNames": ["SentTimestamp", "ApproximateReceiveCount", "MessageGroupId"],
            # origin_*: set only on redriven messages; content-encoding: set by producers of gzip bodies
            "MessageAttributeNames": list(RECEIVED_ATTRIBUTES),
        }
        if visibility_timeout:
            self._request["VisibilityTimeout"] = visibility_timeout
        self._tasks: list[asyncio.Task] = []
        self._polling: set[int] = set()  # receivers inside a receive call (until its messages are handed on)
        self._stopping = False
        self.last_poll_ok = True

    async def run(self) -> None:
        """Run the receivers until cancelled, or until ``stop`` and the calls under way are done."""
        self._tasks = [asyncio.create_task(self._receive(i), name=f"receiver-{i}") for i in range(self.limit.maximum)]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for t in self._tasks:
                t.cancel()

    def stop(self, *, finish_calls: bool = True) -> None:
        """Stop polling; ``run`` returns once the receive calls under way have handed their messages on.

        Cancelling a receive call mid-flight would lose its response: SQS has already made those
        messages invisible, and nobody would hold (and later release) them until the visibility
        timeout ran out. ``finish_calls=False`` cancels them anyway (the queue was seen empty).
        """
        self._stopping = True
        for n, task in enumerate(self._tasks):
            if not finish_calls or n not in self._polling:
                task.cancel()

    async def _receive(self, n: int) -> None:
        try:
            await self._poll(n)
        except asyncio.CancelledError:
            if not self._stopping:
                raise

    async def _poll(self, n: int) -> None:
        receive, request, leases, outbox = self.client.receive_message, self._request, self.leases, self.outbox
        limit, observe_rtt, clock = self.limit, self.stats.rtt["ReceiveMessage"].observe, time.monotonic
        polling, outage = self._polling, self.outage
        failures = 0
        while not self._stopping:
            await limit.acquire()
            try:
                if leases.full(10):
                    limit.congested()
                await leases.reserve(10)
                try:  # after the room: a probe that then waited for room would be a step without a call
                    ticket = await outage.admit()
                except BaseException:
                    leases.unreserve(10)
                    raise
                polling.add(n)
                t0 = clock()
                try:
                    resp = await receive(**request)
                except RETRYABLE as exc:  # even a permanent error (queue deleted) may heal: keep polling, backed off
                    limit.observe(clock() - t0, failed=True)
                    leases.unreserve(10)
                    polling.discard(n)
                    self.last_poll_ok = False
                    if outage.settled(ticket, exc):  # SQS is out of reach: the shared outage paces every caller
                        events.sqs_call_failed(self.stats, "ReceiveMessage", exc, classify(exc), receiver=n)
                        continue
                    failures += 1
                    sleep = backoff.delay(failures)
                    events.sqs_call_failed(self.stats, "ReceiveMessage", exc, classify(exc), receiver=n,
                                           sleep_s=round(sleep, 2))
                    # The permit is kept while backing off: a failing broker gets fewer calls, not the
                    # same number from the other receivers.
                    await asyncio.sleep(sleep)
                    continue
                except BaseException:
                    leases.unreserve(10)
                    raise
                rtt = clock() - t0
                leases.unreserve(10)
                outage.settled(ticket)
                failures = 0
                self.last_poll_ok = True
                msgs = resp.get("Messages")
                observe_rtt(rtt)
                limit.observe(rtt, len(msgs) if msgs else 0)
                if msgs:
                    leases.add(msgs)
                    self.stats.received += len(msgs)
            finally:
                limit.release()  # the call is over; waiting for the transformer below holds no permit
            if msgs:
                if outbox.full():
                    limit.congested()
                await outbox.put(msgs)
            polling.discard(n)
