"""The shared outage gate without servers: one probe per step while unreachable, everyone once it answers."""

from __future__ import annotations

import asyncio
import logging

import pytest
from botocore.exceptions import EndpointConnectionError

from stages.acker import Acker, Committed
from stages.leases import Leases
from stages.outage import Outage
from stages.source import SqsSource
from stages.sqs import unanswered
from stages.stats import Stats
from tests.sqs_fake import FakeSqs, client_error, message


async def until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)


class Service:
    """A dependency that fails in transport while ``down``; counts the calls that reached it."""

    def __init__(self) -> None:
        self.down = True
        self.failed = self.ok = 0

    async def call(self) -> None:
        await asyncio.sleep(0)
        if self.down:
            self.failed += 1
            raise EndpointConnectionError(endpoint_url="http://sqs")
        self.ok += 1


async def caller(outage: Outage, service: Service, calls: int) -> None:
    done = 0
    while done < calls:
        step = await outage.admit()
        try:
            await service.call()
        except EndpointConnectionError:
            outage.failed(step)
            continue
        outage.answered()
        done += 1


async def test_an_outage_costs_one_call_per_step_not_one_per_caller(caplog: pytest.LogCaptureFixture) -> None:
    # CASE: 8 callers meet an outage: the calls under way fail once each, then one probe per step goes
    caplog.set_level(logging.INFO, "pipeline.outage")
    stats, service = Stats(), Service()
    outage = Outage("sqs", stats, unanswered=unanswered, delay=lambda step: 0.02)
    callers = [asyncio.create_task(caller(outage, service, 1)) for _ in range(8)]
    await until(lambda: outage.step >= 8)
    assert stats.unreachable == {"sqs"} and stats.outages["sqs"] == 1
    # Per caller, that would be 8 calls a step. Here: the 8 under way at the onset, then one probe a step. A stall
    # cannot let a second probe in: the probe's failure is queued before any waiter's timer can fire after it.
    assert service.failed <= 8 + outage.step, (service.failed, outage.step)
    service.down = False
    await asyncio.wait_for(asyncio.gather(*callers), 10)
    assert service.ok == 8 and not outage.down and stats.unreachable == set()
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pipeline.outage"]
    assert [lvl for lvl, _ in logged] == ["WARNING", "INFO"], logged  # one line down, one line up: not one per call
    up = [r for r in caplog.records if r.name == "pipeline.outage"][-1]
    assert up.dependency == "sqs" and up.failed_probes >= 7 and up.down_s > 0  # type: ignore[attr-defined]


async def test_any_answer_lets_every_waiting_caller_through() -> None:
    # CASE: callers wait out a long step; a response (even an error) ends the wait for all of them at once
    outage = Outage("sqs", Stats(), unanswered=unanswered, delay=lambda step: 60.0)
    outage.failed(await outage.admit())
    waiting = [asyncio.create_task(outage.admit()) for _ in range(5)]
    await asyncio.sleep(0)
    assert not any(t.done() for t in waiting)
    outage.answered()
    assert [step for _, step in await asyncio.wait_for(asyncio.gather(*waiting), 5)] == [0] * 5


async def test_calls_under_way_at_the_onset_step_the_backoff_once() -> None:
    # CASE: stragglers admitted before the outage report it after it began: one step, not one per straggler
    outage = Outage("sqs", Stats(), unanswered=unanswered, delay=lambda step: 60.0)
    steps = [await outage.admit() for _ in range(10)]
    for s in steps:
        outage.failed(s)
    assert outage.step == 1


async def test_a_hanging_probe_holds_no_one_past_its_step() -> None:
    # CASE: the probe never returns (or is cancelled); the next step admits another caller
    outage = Outage("sqs", Stats(), unanswered=unanswered, delay=lambda step: 0.01)
    outage.failed(await outage.admit())
    first = await asyncio.wait_for(outage.admit(), 5)  # this probe hangs: it never reports
    second = await asyncio.wait_for(outage.admit(), 5)
    assert first == second and first[1] == 1 and outage.step == 1


async def test_a_call_that_fails_after_the_recovery_starts_no_new_outage() -> None:
    # CASE: a long poll admitted before the outage times out only after SQS answered again: old news
    stats = Stats()
    outage = Outage("sqs", stats, unanswered=unanswered, delay=lambda step: 0.01)
    long_poll, other = await outage.admit(), await outage.admit()
    outage.failed(other)
    probe = await asyncio.wait_for(outage.admit(), 5)
    outage.answered()  # the probe got an answer
    outage.failed(long_poll)
    outage.failed(probe)
    assert not outage.down and stats.outages["sqs"] == 1


async def test_receivers_and_deletes_share_one_outage() -> None:
    # CASE: SqsSource and Acker on one Outage: a delete that finds SQS unreachable holds the receivers back too
    sqs = FakeSqs()
    stats, leases = Stats(), Leases(100)
    outage = Outage("sqs", stats, unanswered=unanswered, delay=lambda step: 60.0)
    msgs = [message(i) for i in range(3)]
    leases.add(msgs)
    sqs.then("delete", EndpointConnectionError(endpoint_url="http://sqs"))
    inbox: asyncio.Queue = asyncio.Queue()
    acker = Acker(sqs, "q", "dlq", inbox, leases, stats, 1, outage=outage)
    source = SqsSource(sqs, "q", asyncio.Queue(), leases, stats, receivers=2, wait_time_seconds=0, outage=outage)
    inbox.put_nowait(Committed(msgs))
    acking = asyncio.create_task(acker.run())
    await until(lambda: outage.down)
    receiving = asyncio.create_task(source.run())
    await asyncio.sleep(0.05)
    assert sqs.calls["receive"] == []  # the receivers wait for the step's probe
    outage.answered()  # e.g. another instance's call came back: everyone goes
    await until(lambda: len(sqs.calls["receive"]) >= 2 and stats.acked == 3)
    source.stop(finish_calls=False)
    inbox.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(acking, receiving), 10)
    assert stats.errors["sqs"] == 1


async def test_an_error_response_is_not_an_outage() -> None:
    # CASE: SQS answers with an error (throttled): the caller backs off alone; nobody else is held
    sqs = FakeSqs().then("delete", client_error("ThrottlingException", "DeleteMessageBatch"))
    stats, leases = Stats(), Leases(100)
    msgs = [message(1)]
    leases.add(msgs)
    inbox: asyncio.Queue = asyncio.Queue()
    acker = Acker(sqs, "q", "dlq", inbox, leases, stats, 1)
    for item in (Committed(msgs), None):
        inbox.put_nowait(item)
    await asyncio.wait_for(acker.run(), 10)
    assert stats.acked == 1 and stats.outages == {} and not acker.outage.down
