"""SqsSource and Acker against LocalStack: long-poll receive, in-flight cap, delete, DLQ."""

from __future__ import annotations

import asyncio

from stages.stats import Stats
from pipeline.clients import sqs_client
from stages.acker import Acker, Committed, DeadLetter
from stages.leases import Leases, release
from stages.source import SqsSource
from tests.helpers import drain, make_settings, queue_counts, send_bodies, wait_until


async def test_source_respects_in_flight_cap_and_acker_deletes(queues) -> None:  # type: ignore[no-untyped-def]
    send_bodies(queues.client, queues.queue_url, [f'{{"n": {i}}}' for i in range(45)])
    settings = make_settings(queues, "postgresql://unused", "k:x")
    stats = Stats()
    leases = Leases(max_in_flight=20)
    out: asyncio.Queue = asyncio.Queue()
    acks: asyncio.Queue = asyncio.Queue()
    async with sqs_client(settings) as client:
        source = SqsSource(client, queues.queue_url, out, leases, stats, receivers=4, wait_time_seconds=1)
        task = asyncio.create_task(source.run())
        await wait_until(lambda: stats.received >= 20, 30, "the in-flight cap to fill")
        assert stats.received == 20 == len(leases)  # the cap stops polling
        acker = Acker(client, queues.queue_url, queues.dlq_url, acks, leases, stats, concurrency=3)
        acker_task = asyncio.create_task(acker.run())
        handed = 0
        while handed < 45:  # counts what was handed on, not what was acked yet: no batch is awaited twice
            batch = await asyncio.wait_for(out.get(), 30)
            assert all("SentTimestamp" in m["Attributes"] and "ApproximateReceiveCount" in m["Attributes"] for m in batch)
            await acks.put(Committed(batch))
            handed += len(batch)
        await wait_until(lambda: stats.acked >= 45, 30, "every message to be deleted")
        task.cancel()
        await acks.put(None)
        await acker_task
    assert stats.acked == 45 and len(leases) == 0
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)


async def test_dead_letters_carry_reason_and_leave_the_source(queues) -> None:  # type: ignore[no-untyped-def]
    send_bodies(queues.client, queues.queue_url, ["bad-1", "bad-2"])
    settings = make_settings(queues, "postgresql://unused", "k:x")
    stats, leases = Stats(), Leases(100)
    out: asyncio.Queue = asyncio.Queue()
    acks: asyncio.Queue = asyncio.Queue()
    async with sqs_client(settings) as client:
        source = SqsSource(client, queues.queue_url, out, leases, stats, receivers=1, wait_time_seconds=1)
        task = asyncio.create_task(source.run())
        msgs: list[dict] = []
        while len(msgs) < 2:
            msgs += await asyncio.wait_for(out.get(), 10)
        task.cancel()
        await acks.put(DeadLetter([(m, "body.json", "body: not valid JSON") for m in msgs]))
        await acks.put(None)
        await Acker(client, queues.queue_url, queues.dlq_url, acks, leases, stats, 2).run()
    dead = drain(queues.client, queues.dlq_url)
    assert sorted(m["Body"] for m in dead) == ["bad-1", "bad-2"]
    assert {m["MessageAttributes"]["reason"]["StringValue"] for m in dead} == {"body: not valid JSON"}
    assert stats.rejected == 2 and queue_counts(queues.client, queues.queue_url) == (0, 0)


async def test_invalid_receipt_handle_is_counted_not_fatal(queues) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(queues, "postgresql://unused", "k:x")
    stats, leases = Stats(), Leases(100)
    acks: asyncio.Queue = asyncio.Queue()
    await acks.put(Committed([{"ReceiptHandle": "bogus", "MessageId": "x"}]))
    await acks.put(None)
    async with sqs_client(settings) as client:
        await asyncio.wait_for(Acker(client, queues.queue_url, queues.dlq_url, acks, leases, stats, 1).run(), 30)
    assert stats.acked == 0 and stats.ack_failures == 1


async def test_release_makes_held_messages_visible_at_once(queues) -> None:  # type: ignore[no-untyped-def]
    send_bodies(queues.client, queues.queue_url, ["a", "b", "c"])
    settings = make_settings(queues, "postgresql://unused", "k:x", sqs={"visibility_timeout": 300})
    stats, leases = Stats(), Leases(100)
    out: asyncio.Queue = asyncio.Queue()
    async with sqs_client(settings) as client:
        source = SqsSource(client, queues.queue_url, out, leases, stats, receivers=1, wait_time_seconds=1,
                           visibility_timeout=300)
        task = asyncio.create_task(source.run())
        while stats.received < 3:
            await asyncio.sleep(0.1)
        source.stop()  # the receive call under way finishes (no abandoned long poll to take the released ones)
        await asyncio.wait_for(task, 30)
        assert queue_counts(queues.client, queues.queue_url) == (0, 3)
        await release(client, queues.queue_url, leases, stats)
    assert queue_counts(queues.client, queues.queue_url) == (3, 0)
