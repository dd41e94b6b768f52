"""SqsSource and Acker under an adaptive limit, against the in-memory SQS fake with added latency.

Functional only: each test waits (with a deadline) for the limit to move the expected way.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from stages import backoff
from stages import source as source_module
from stages.acker import Acker, Committed
from stages.concurrency import Limiter
from stages.leases import Leases
from stages.source import SqsSource
from stages.stats import Stats
from tests.sqs_fake import FakeSqs, client_error, message
from tests.unit.test_concurrency import Clock


async def until(cond: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.02)


class Endless(FakeSqs):
    """A backlog that never runs out, and the most receive calls seen under way at once."""

    def __init__(self, latency: float) -> None:
        super().__init__()
        self.latency, self.n, self.now, self.most = latency, 0, 0, 0

    async def receive_message(self, **request: Any) -> dict:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            if self.script["receive"]:
                return await super().receive_message(**request)
            await asyncio.sleep(self.latency)
            self.n += 10
            return {"Messages": [message(i) for i in range(self.n - 10, self.n)]}
        finally:
            self.now -= 1


async def run_source(sqs: FakeSqs, receivers: int | Limiter, *, cap: int = 100_000, consume_every: float = 0.0,
                     until_: Callable[[Stats], bool]) -> tuple[Stats, SqsSource]:
    stats, leases, out = Stats(), Leases(cap), asyncio.Queue(4)
    source = SqsSource(sqs, "q", out, leases, stats, receivers=receivers, wait_time_seconds=0)

    async def consume() -> None:  # the rest of the pipeline: take batches, ack them
        while True:
            batch = await out.get()
            if consume_every:
                await asyncio.sleep(consume_every)
            leases.drop([m["ReceiptHandle"] for m in batch])

    tasks = [asyncio.create_task(source.run()), asyncio.create_task(consume())]
    try:
        await until(lambda: until_(stats))
    finally:
        source.stop(finish_calls=False)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return stats, source


async def test_receive_concurrency_grows_under_latency() -> None:
    # CASE: 30 ms per receive, unlimited backlog and room downstream -> more receivers than it started with
    sqs = Endless(0.03)
    stats, source = await run_source(sqs, Limiter("receive", start=2, maximum=32),
                                     until_=lambda s: s.concurrency["receive"] >= 8)
    assert sqs.most <= 32 and stats.rtt["ReceiveMessage"].count > 0


class Saturated(Endless):
    """A broker that serves one receive at a time: more calls in flight only queue (loopback, CPU-bound).

    On a virtual clock shared with the source and its limit: each call served advances it by
    ``service``, so round trips (queueing included) are what the broker does, not what a loaded
    test machine's scheduler adds.
    """

    def __init__(self, service: float, clock: Clock) -> None:
        super().__init__(service)
        self.clock = clock
        self.lock = asyncio.Lock()
        self.calls = self.most_calls = 0  # calls under way, queued ones included

    async def receive_message(self, **request: Any) -> dict:
        self.calls += 1
        self.most_calls = max(self.most_calls, self.calls)
        try:
            async with self.lock:
                await asyncio.sleep(0)
                self.clock.now += self.latency
                self.n += 10
                return {"Messages": [message(i) for i in range(self.n - 10, self.n)]}
        finally:
            self.calls -= 1


async def test_receive_concurrency_does_not_grow_where_it_adds_no_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    # CASE: every receive is full and permits are busy (demand), but the round trip rises with the
    # concurrency: growth stops where calls queue (one step), a step further is taken back
    clock = Clock()
    monkeypatch.setattr(source_module, "time", SimpleNamespace(monotonic=clock))
    sqs = Saturated(0.002, clock)
    stats, _ = await run_source(sqs, Limiter("receive", start=4, maximum=64, clock=clock),
                                until_=lambda s: s.received >= 1500 and s.concurrency["receive"] <= 8)
    assert sqs.most_calls <= 16  # one step to where calls queue, one more as a probe, never compounded


async def test_receive_concurrency_shrinks_on_throttling(monkeypatch: pytest.MonkeyPatch) -> None:
    # CASE: receives are throttled -> the limit falls below its start (and the errors are counted)
    monkeypatch.setattr(backoff, "delay", lambda attempt: 0.01)
    sqs = Endless(0.01)
    sqs.then("receive", *[client_error("ThrottlingException", "ReceiveMessage", 400) for _ in range(5000)])
    stats, _ = await run_source(sqs, Limiter("receive", start=16, minimum=2, maximum=32),
                                until_=lambda s: s.concurrency["receive"] == 2)
    assert stats.errors["sqs"] > 0


async def test_receive_concurrency_shrinks_when_downstream_is_full() -> None:
    # CASE: a slow consumer and a small in-flight cap: polls wait for room -> the limit shrinks, the cap holds
    sqs = Endless(0.005)
    stats, source = await run_source(sqs, Limiter("receive", start=16, maximum=32), cap=40, consume_every=0.05,
                                     until_=lambda s: s.concurrency["receive"] < 8)
    assert len(source.leases) <= 40


async def test_pinned_receive_concurrency_is_honoured() -> None:
    # CASE: receivers=3 (a plain number: pinned) -> never more than 3 calls at once, the gauge stays 3
    sqs = Endless(0.02)
    stats, _ = await run_source(sqs, 3, until_=lambda s: s.received >= 600)
    assert sqs.most == 3 and stats.concurrency["receive"] == 3


async def test_delete_concurrency_grows_while_deletes_lag() -> None:
    # CASE: 30 ms per delete and commits arriving faster than 2 slots can delete -> more delete slots
    sqs = FakeSqs()
    sqs.latency = 0.03
    stats, leases, inbox = Stats(), Leases(10**9), asyncio.Queue(8)
    acker = Acker(sqs, "q", "q-dlq", inbox, leases, stats, Limiter("delete", start=2, maximum=64))
    task = asyncio.create_task(acker.run())

    async def feed() -> None:
        i = 0
        while True:
            batch = [message(j) for j in range(i, i + 100)]
            i += 100
            leases.add(batch)
            await inbox.put(Committed(batch))

    feeder = asyncio.create_task(feed())
    try:
        await until(lambda: stats.concurrency["delete"] >= 8)
    finally:
        feeder.cancel()
        task.cancel()
        await asyncio.gather(feeder, task, return_exceptions=True)
    assert stats.acked > 0 and stats.rtt["DeleteMessageBatch"].count > 0
