"""SQS source: N concurrent long-poll receivers feeding one bounded queue.

Backpressure is two-fold: a receiver reserves room under the in-flight cap before it
polls, and ``put`` on the bounded queue blocks while the transformer is behind. Either
way a full pipeline stops polling instead of buffering without bound.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import backoff, events
from .leases import Leases
from .message import ORIGIN_ATTRIBUTES
from .sqs import RETRYABLE, classify
from .stats import Stats

__all__ = ["SqsSource"]

log = logging.getLogger("pipeline.source")


class SqsSource:
    def __init__(
        self, client: Any, queue_url: str, outbox: asyncio.Queue, leases: Leases, stats: Stats, *,
        receivers: int, wait_time_seconds: int, visibility_timeout: int = 0,
    ) -> None:
        self.client, self.queue_url, self.outbox = client, queue_url, outbox
        self.leases, self.stats = leases, stats
        self.receivers = receivers
        self._request: dict[str, Any] = {
            "QueueUrl": queue_url,
            "MaxNumberOfMessages": 10,
            "WaitTimeSeconds": wait_time_seconds,
            # MessageGroupId: a FIFO message's dead letter keeps its group (absent on standard queues).
            "MessageSystemAttributeNames": ["SentTimestamp", "ApproximateReceiveCount", "MessageGroupId"],
            "MessageAttributeNames": list(ORIGIN_ATTRIBUTES),  # set only on redriven messages
        }
        if visibility_timeout:
            self._request["VisibilityTimeout"] = visibility_timeout
        self._tasks: list[asyncio.Task] = []
        self._polling: set[int] = set()  # receivers inside a receive call (until its messages are handed on)
        self._stopping = False
        self.last_poll_ok = True

    async def run(self) -> None:
        """Run the receivers until cancelled, or until ``stop`` and the calls under way are done."""
        self._tasks = [asyncio.create_task(self._receive(i), name=f"receiver-{i}") for i in range(self.receivers)]
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
        receive, request, leases, put = self.client.receive_message, self._request, self.leases, self.outbox.put
        polling = self._polling
        failures = 0
        while not self._stopping:
            await leases.reserve(10)
            polling.add(n)
            try:
                resp = await receive(**request)
            except RETRYABLE as exc:  # even a permanent error (queue deleted) may heal: keep polling, backed off
                leases.unreserve(10)
                polling.discard(n)
                self.last_poll_ok = False
                failures += 1
                sleep = backoff.delay(failures)
                events.sqs_call_failed(self.stats, "ReceiveMessage", exc, classify(exc), receiver=n, sleep_s=round(sleep, 2))
                await asyncio.sleep(sleep)
                continue
            except BaseException:
                leases.unreserve(10)
                raise
            leases.unreserve(10)
            failures = 0
            self.last_poll_ok = True
            msgs = resp.get("Messages")
            if msgs:
                leases.add(msgs)
                self.stats.received += len(msgs)
                await put(msgs)
            polling.discard(n)
