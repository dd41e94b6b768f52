"""Wiring and lifecycle: build the stages, link them with bounded queues, run, drain, stop.

    SqsSource ──raw──▶ Transformer ──rows──▶ CopySink ──acks──▶ Acker ──▶ DeleteMessageBatch
         ▲                  └──────── dead letters ─────────────▶ │ ──▶ DLQ SendMessageBatch
         └──────────── Leases (in-flight cap, heartbeat, release) ◀┘

Shutdown is by sentinel: the source stops polling, ``None`` flows down the queues so each
stage finishes what it holds, and the acker drains last. If that takes longer than the
grace period, whatever is still held is released (visibility 0) for another consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from botocore.exceptions import BotoCoreError, ClientError

from stages import events
from stages.acker import Acker
from stages.concurrency import Limiter
from stages.leases import Heartbeat, Leases, release
from stages.sink import CopySink, create_stage_table
from stages.source import SqsSource
from stages.sqs import classify, unanswered
from stages.offload import TransformPool, default_workers
from stages.outage import Outage
from stages.transform import Decoding, Transformer

from stages.stats import Stats

from .clients import check_queues, connect_postgres, masker_for, queue_backlog, sqs_client
from .schema import migrate
from .table.maintenance import maintenance_loop
from .table.partitions import Layout
from .settings import Settings

__all__ = ["run", "Runtime"]

log = logging.getLogger("pipeline")


@dataclass(eq=False)
class Runtime:
    """Live state that the HTTP endpoint and progress reporting read."""

    settings: Settings
    stats: Stats = field(default_factory=Stats)
    leases: Leases | None = None
    queues: dict[str, asyncio.Queue] = field(default_factory=dict)
    source: SqsSource | None = None
    sink: CopySink | None = None
    acker: Acker | None = None
    client: Any = None
    pool: asyncpg.Pool | None = None
    running: bool = False
    backlog: dict[str, int] = field(default_factory=dict)


async def run(
    settings: Settings, *, until_empty: bool = False, stop: asyncio.Event | None = None,
    runtime: Runtime | None = None,
) -> dict:
    """Run the pipeline until ``stop`` is set (or the queue is drained); return the summary."""
    rt = runtime or Runtime(settings)
    stats = rt.stats
    stop = stop or asyncio.Event()
    s, p = settings.sqs, settings.pipeline
    masker = await masker_for(settings)
    async with contextlib.AsyncExitStack() as stack:
        if settings.http.port:  # first in, last out: probes answer while starting and draining
            from .http import serve

            await stack.enter_async_context(serve(rt, settings.http.host, settings.http.port))
        client = rt.client = await stack.enter_async_context(sqs_client(settings))
        await check_queues(client, settings)
        conn = await connect_postgres(settings)
        try:
            changes = await migrate(conn, settings.postgres.table, Layout.of(settings))
        finally:
            await conn.close()
        if changes:
            log.info("migrated table", extra={"table": settings.postgres.table, "statements": len(changes)})
        table = settings.postgres.table
        pool = rt.pool = await asyncpg.create_pool(
            settings.postgres.dsn.get_secret_value(), min_size=1, max_size=settings.postgres.pool_size,
            init=lambda c: create_stage_table(c, table), command_timeout=60,
        )
        stack.push_async_callback(pool.close)

        raw: asyncio.Queue = asyncio.Queue(p.queue_size)
        rows: asyncio.Queue = asyncio.Queue(p.queue_size)
        acks: asyncio.Queue = asyncio.Queue(p.queue_size * 4)
        rt.queues = {"raw": raw, "rows": rows, "acks": acks}
        leases = rt.leases = Leases(s.max_in_flight, p.max_in_flight_rows, p.max_in_flight_bytes)
        outage = Outage("sqs", stats, unanswered=unanswered)  # receives, deletes and dead letters meet an unreachable SQS as one
        source = rt.source = SqsSource(
            client, s.queue_url, raw, leases, stats, receivers=_limiter(s, "receive"),
            wait_time_seconds=s.wait_time_seconds, visibility_timeout=s.visibility_timeout, outage=outage,
        )
        how = Decoding(envelope=s.envelope, max_decoded_bytes=p.max_decoded_bytes, max_events=p.max_events_per_message)
        workers = p.transform_workers if p.transform_workers != "auto" else default_workers(p.processes)
        transformer = Transformer(raw, rows, acks, masker, stats, s.max_receive_count, leases=leases, decoding=how,
                                  workers=TransformPool(workers, masker, how) if workers else None)
        sink = rt.sink = CopySink(
            pool, table, rows, acks, stats, batch_size=p.batch_size, batch_timeout=p.batch_timeout,
            concurrency=p.write_concurrency, write_method=settings.postgres.write_method,
        )
        acker = rt.acker = Acker(client, s.queue_url, s.dlq_url, acks, leases, stats, _limiter(s, "delete"),
                                 outage=outage, auth=masker.origin_auth)
        acker.limit.follows = source.limit  # acks keep up with receives: deletes may grow to the receive limit
        heartbeat = Heartbeat(client, s.queue_url, leases, stats, s.visibility_timeout or 30)

        source_task = asyncio.create_task(source.run(), name="source")
        stage_tasks = [
            asyncio.create_task(transformer.run(), name="transformer"),
            asyncio.create_task(sink.run(), name="sink"),
            asyncio.create_task(acker.run(), name="acker"),
        ]
        helpers = [
            asyncio.create_task(heartbeat.run(), name="heartbeat"),
            asyncio.create_task(_progress(rt, p.progress_interval), name="progress"),
            asyncio.create_task(maintenance_loop(settings), name="table-maintenance"),  # months ahead, retention
        ]
        if until_empty:
            helpers.append(asyncio.create_task(_until_empty(rt, stop), name="until-empty"))
        rt.running = True
        log.info("pipeline started", extra={"queue_url": s.queue_url, "table": table, "receive_concurrency": s.receive_concurrency,
                                            "delete_concurrency": s.delete_concurrency,
                                            "batch_size": p.batch_size, "key_id": masker.active})
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, source_task, *stage_tasks], return_when=asyncio.FIRST_COMPLETED)
            crashed = [t for t in done if t is not stopper and not t.cancelled() and t.exception() is not None]
            if crashed:
                raise crashed[0].exception()  # type: ignore[misc]
            log.info("draining", extra={"held": len(leases)})
            # --until-empty saw the queue empty: no need to let empty long polls run out.
            emptied = any(t.get_name() == "until-empty" and t.done() for t in helpers)
            source.stop(finish_calls=not emptied)
            try:  # one grace period for all of it: a stuck sink must not keep `raw.put` waiting
                await asyncio.wait_for(_drain(source_task, raw, stage_tasks), p.grace_seconds)
            except asyncio.TimeoutError:
                log.warning("grace period over, releasing unfinished messages", extra={"held": len(leases)})
        finally:
            rt.running = False
            stopper.cancel()
            for t in [source_task, *stage_tasks, *helpers]:
                t.cancel()
            await asyncio.gather(source_task, *stage_tasks, *helpers, return_exceptions=True)
            if len(leases):
                await release(client, s.queue_url, leases, stats)
    summary = stats.summary()
    # Distinct messages whose dead letter SQS refused for good, by error code: they are still on the source queue.
    summary["not_dead_lettered"] = dict(Counter(acker.refused.values()))
    log.info("pipeline stopped", extra=summary)
    return summary


def _limiter(s: Any, op: str) -> Limiter:
    """The adaptive (or pinned) limit on ``receive`` or ``delete`` calls, from ``sqs.*_concurrency`` and its bounds."""
    start, low, high, pinned = s.concurrency(op)
    return Limiter(op, start=start, minimum=low, maximum=high, pinned=pinned)


async def _drain(source_task: asyncio.Task, raw: asyncio.Queue, stage_tasks: list[asyncio.Task]) -> None:
    """Let the stopped source hand on its last messages, then send the sentinel down the stages."""
    await source_task
    await raw.put(None)
    await asyncio.gather(*stage_tasks)


def _idle(rt: Runtime) -> bool:
    return len(rt.leases or ()) == 0 and all(q.empty() for q in rt.queues.values())


async def _until_empty(rt: Runtime, stop: asyncio.Event, interval: float = 0.5) -> None:
    """Stop once the queue has nothing visible, in flight or delayed, and we hold nothing.

    Nothing, that is, but the messages whose dead letters SQS refused: they return after each
    visibility timeout and are refused again, so waiting for them would never end. The run then
    ends and the CLI reports them (``not_dead_lettered``) with a non-zero exit.

    Messages in flight elsewhere (a crashed consumer's) count: we wait for them to become
    visible again and process them, so a restart after a crash really drains the queue.
    """
    quiet = 0
    while True:
        await asyncio.sleep(interval)
        try:
            rt.backlog = await queue_backlog(rt.client, rt.settings.sqs.queue_url)
        except (BotoCoreError, ClientError, OSError) as exc:
            events.sqs_call_failed(rt.stats, "GetQueueAttributes", exc, classify(exc))
            quiet = 0
            continue
        # Messages whose dead letter SQS refused stay on the queue for good: they must not keep us waiting.
        refused = len(rt.acker.refused) if rt.acker is not None else 0
        if sum(rt.backlog.values()) <= refused and _idle(rt):
            quiet += 1
            if quiet >= 2:
                stop.set()
                return
        else:
            quiet = 0


async def _progress(rt: Runtime, interval: float) -> None:
    stats = rt.stats
    last, last_t = 0, time.monotonic()
    while True:
        await asyncio.sleep(interval)
        if rt.client is not None:  # the backlog, for this line and for /metrics
            with contextlib.suppress(BotoCoreError, ClientError, OSError, asyncio.TimeoutError):
                rt.backlog = await asyncio.wait_for(queue_backlog(rt.client, rt.settings.sqs.queue_url), 5)
        now = time.monotonic()
        log.info("progress", extra={
            "rate_per_s": round((stats.inserted - last) / (now - last_t), 1),
            "received": stats.received, "inserted": stats.inserted, "duplicates": stats.duplicates,
            "rejected": stats.rejected, "acked": stats.acked, "held": len(rt.leases or ()),
            "held_rows": rt.leases.rows if rt.leases is not None else 0,
            "held_bytes": rt.leases.bytes if rt.leases is not None else 0,
            "backlog": rt.backlog, "receive_concurrency": stats.concurrency.get("receive"),
            "delete_concurrency": stats.concurrency.get("delete"),
        })
        last, last_t = stats.inserted, now
