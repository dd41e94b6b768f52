"""SQS source: N concurrent long-poll receivers feeding one bounded queue.

Backpressure is two-fold: a receiver reserves room under the in-flight cap before it
polls, and ``put`` on the bounded queue blocks while the transformer is behind. Either
way a full pipeline stops polling instead of buffering without bound.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from pipeline.metrics import Stats

from .acker import RETRYABLE, Leases, _describe

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
            "MessageSystemAttributeNames": ["SentTimestamp", "ApproximateReceiveCount"],
        }
        if visibility_timeout:
            self._request["VisibilityTimeout"] = visibility_timeout
        self._tasks: list[asyncio.Task] = []
        self.last_poll_ok = True

    async def run(self) -> None:
        """Run the receivers until cancelled (``stop``)."""
        self._tasks = [asyncio.create_task(self._receive(i), name=f"receiver-{i}") for i in range(self.receivers)]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for t in self._tasks:
                t.cancel()

    async def _receive(self, n: int) -> None:
        receive, request, leases, put = self.client.receive_message, self._request, self.leases, self.outbox.put
        backoff = 0.0
        while True:
            await leases.reserve(10)
            try:
                resp = await receive(**request)
            except RETRYABLE as exc:
                leases.unreserve(10)
                self.stats.errors["sqs"] += 1
                self.last_poll_ok = False
                backoff = min(max(backoff * 2, 0.2), 10.0)
                log.warning("receive failed, backing off", extra={"error": _describe(exc), "receiver": n, "sleep_s": round(backoff, 2)})
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                continue
            except BaseException:
                leases.unreserve(10)
                raise
            leases.unreserve(10)
            backoff = 0.0
            self.last_poll_ok = True
            msgs = resp.get("Messages")
            if msgs:
                leases.add(msgs)
                self.stats.received += len(msgs)
                await put(msgs)
