"""The phases. Each runs in a child process (``Child``) and returns ``Meter.result()``.

A fresh process per phase keeps its CPU time and peak RSS its own, and nothing of the
parent's event loop or clients leaks in (spawned, not forked).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from ... import aio
from ...settings import Settings
from .meter import Meter, merge

__all__ = ["run_pipeline_phase", "Child"]


async def _phase_broker(settings: Settings, expected: int, pollers: int, deleters: int) -> dict:
    """(a) receive + delete, nothing in between: the pipeline's shape without its work.

    ``pollers`` hand receive batches to ``deleters`` through a queue capped like the pipeline's
    in-flight messages, so polling never waits for a delete, as in the pipeline; the same
    client and request. ``bench`` runs it at a few concurrencies and keeps the best: the
    ceiling the adaptive pipeline is compared with.
    """
    from ...clients import sqs_client

    s = settings.sqs
    meter = Meter()
    done = 0
    request: dict[str, Any] = {
        "QueueUrl": s.queue_url, "MaxNumberOfMessages": 10, "WaitTimeSeconds": s.wait_time_seconds,
        "MessageSystemAttributeNames": ["SentTimestamp", "ApproximateReceiveCount"],
    }
    if s.visibility_timeout:
        request["VisibilityTimeout"] = s.visibility_timeout
    finished = asyncio.Event()
    received: asyncio.Queue = asyncio.Queue(max(1, s.max_in_flight // 10))
    async with sqs_client(settings, concurrency=pollers + deleters) as client:

        async def poll() -> None:
            while True:
                msgs = (await client.receive_message(**request)).get("Messages")
                if msgs:
                    meter.working()
                    await received.put(msgs)

        async def delete() -> None:
            nonlocal done
            while True:
                msgs = await received.get()
                await client.delete_message_batch(QueueUrl=s.queue_url, Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])
                done += len(msgs)
                meter.event(len(msgs))
                if done >= expected:
                    finished.set()

        meter.counter = lambda: done
        meter.start()
        workers = [asyncio.create_task(poll()) for _ in range(pollers)]
        workers += [asyncio.create_task(delete()) for _ in range(deleters)]
        await _until(finished, workers, timeout=_deadline(expected))
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        return await meter.stop()


async def _phase_pipeline(settings: Settings, expected: int, ready: Any = None, shared: Any = None) -> dict:
    """(b) the pipeline itself, stopped once ``expected`` messages are acked (by all workers)."""
    from ...runner import Runtime, run

    rt = Runtime(settings)
    meter = Meter(counter=lambda: rt.stats.acked)
    stop = asyncio.Event()

    async def watch() -> None:
        pushed = 0
        while True:
            await asyncio.sleep(0.05)
            if ready is not None and rt.running:
                ready.set()
            if rt.stats.received:
                meter.working()
            acked = rt.stats.acked
            if shared is not None:
                with shared.get_lock():
                    shared.value += acked - pushed
                    total = shared.value
                pushed = acked
            else:
                total = acked
            if total >= expected:
                stop.set()
                return

    meter.start()
    meter.follow(rt.stats)
    watcher = asyncio.create_task(watch())
    try:
        summary = await asyncio.wait_for(run(settings, stop=stop, runtime=rt), _deadline(expected))
    finally:
        watcher.cancel()
    result = await meter.stop()
    result["summary"] = summary
    return result


async def _phase_core(settings: Settings, bodies: list[str]) -> dict:
    """(c) in-memory bodies → Transformer → CopySink, next to a raw COPY-with-upsert of the rows."""
    import asyncpg

    from stages.masking import Masker, parse_key
    from stages.sink import STAGE_TABLE, CopySink, create_stage_table, upsert_sql
    from stages.sqs import chunks
    from stages.transform import COLUMNS, Transformer, to_row

    from ...metrics import Stats
    from ...schema import migrate

    p = settings.pipeline
    table = settings.postgres.table
    masker = Masker([parse_key(settings.masking.key.get_secret_value())])
    sent = str(int(time.time() * 1000))
    msgs = [{"MessageId": f"m-{i}", "ReceiptHandle": f"h-{i}", "Body": b,
             "Attributes": {"SentTimestamp": sent, "ApproximateReceiveCount": "1"}} for i, b in enumerate(bodies)]
    batches = list(chunks(msgs))
    dsn = settings.postgres.dsn.get_secret_value()
    conn = await asyncpg.connect(dsn)
    await migrate(conn, table)
    await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=settings.postgres.pool_size,
                                     init=lambda c: create_stage_table(c, table))
    results: dict[str, Any] = {}
    try:
        # Raw COPY-with-upsert: rows built beforehand, the same statements CopySink runs, with as many
        # transactions in flight as the sink (``pipeline.write_concurrency``): the ceiling the sink could reach.
        # At least RAW_BATCHES batches (the bodies again under fresh ids): a rate is counted from the first
        # commit, and with ten batches two in flight the second one's work, done before that, would count
        # inside the window (+11 %); with fifty, 2 %.
        pre = [to_row(m["Body"], m["MessageId"], int(sent), masker) for m in msgs]
        rows = [(f"r-{i}", *pre[i % len(pre)][1:]) for i in range(max(len(pre), RAW_BATCHES * p.batch_size))]
        del pre
        insert = upsert_sql(table)
        for name, staged in (("raw_copy", True), ("raw_direct_copy", False)):
            # raw_direct_copy: the sink's usual path (no stored key met), COPY straight into the table
            await pool.execute(f"TRUNCATE {table}")
            meter = Meter()
            meter.start()
            meter.working()
            todo = iter(list(chunks(rows, p.batch_size)))

            async def copier() -> None:
                async with pool.acquire() as c:
                    for chunk in todo:
                        async with c.transaction():
                            if staged:
                                await c.copy_records_to_table(STAGE_TABLE, records=chunk, columns=COLUMNS,
                                                              schema_name="pg_temp")
                                await c.execute(insert)
                            else:
                                await c.copy_records_to_table(table.lower(), records=chunk, columns=COLUMNS)
                        meter.event(len(chunk))

            await asyncio.gather(*(copier() for _ in range(p.write_concurrency)))
            results[name] = await meter.stop()
            results[name]["transactions_in_flight"] = p.write_concurrency
        del rows

        await pool.execute(f"TRUNCATE {table}")
        stats = Stats()
        raw: asyncio.Queue = asyncio.Queue(p.queue_size)
        out: asyncio.Queue = asyncio.Queue(p.queue_size)
        acks: asyncio.Queue = asyncio.Queue(p.queue_size * 4)
        meter = Meter(counter=lambda: stats.inserted)
        transformer = Transformer(raw, out, acks, masker, stats, settings.sqs.max_receive_count)
        sink = CopySink(pool, table, out, acks, stats, batch_size=p.batch_size, batch_timeout=p.batch_timeout,
                        concurrency=p.write_concurrency, write_method=settings.postgres.write_method)

        async def feed() -> None:
            meter.working()
            for b in batches:
                await raw.put(b)
            await raw.put(None)

        async def drain_acks() -> None:
            while await acks.get() is not None:
                pass

        meter.start()
        meter.follow(stats, latency=False)  # the bodies' SentTimestamp is when they were built: no latency here
        await asyncio.gather(feed(), transformer.run(), sink.run(), drain_acks())
        results["core"] = await meter.stop()
        results["core"]["inserted"] = stats.inserted
    finally:
        await pool.close()
    return results


RAW_BATCHES = 50


def _deadline(n: int) -> float:
    return 120 + n / 100  # a stuck phase fails instead of hanging the benchmark


async def _until(event: asyncio.Event, tasks: list[asyncio.Task], timeout: float) -> None:
    waiter = asyncio.create_task(event.wait())
    done, _ = await asyncio.wait([waiter, *tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for t in done:
        if t is not waiter and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    if not done:
        raise TimeoutError(f"phase did not finish within {timeout:.0f} s")


def _child_main(fn_name: str, args: tuple, conn: Any) -> None:
    """Entry point of a phase process: run the phase, send back its result (or its error)."""
    from ...logs import setup_logging

    setup_logging("WARNING")
    fn = globals()[fn_name]
    try:
        conn.send(("ok", aio.run(fn(*args))))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class Child:
    """One phase process (spawned: nothing of the parent's event loop or clients leaks in)."""

    def __init__(self, fn_name: str, *args: Any) -> None:
        # Not daemonic: a pipeline phase starts transform workers of its own (stages.offload)
        self.proc, self._recv = aio.spawn(_child_main, fn_name, args, daemon=False)

    async def result(self) -> dict:
        try:
            status, value = await aio.receive(self._recv)
        except EOFError:
            status, value = "died", None
        await asyncio.to_thread(self.proc.join, 10)
        if status == "died":
            value = f"phase process died (exit code {self.proc.exitcode})"
        if status != "ok":
            raise RuntimeError(f"benchmark phase failed: {value}")
        return value


async def run_pipeline_phase(settings: Settings, expected: int, on_ready: Callable[[], Any] | None = None) -> dict:
    """(b) with ``pipeline.processes`` workers; their events and latencies are merged."""
    n = settings.pipeline.processes
    shared = aio.SPAWN.Value("q", 0)
    ready = aio.SPAWN.Event()
    kids = [Child("_phase_pipeline", settings, expected, ready, shared) for _ in range(n)]
    if on_ready is not None:
        await asyncio.to_thread(ready.wait, 120)
        await on_ready()
    results = [await k.result() for k in kids]
    if n == 1:
        return results[0]
    return merge(results)
