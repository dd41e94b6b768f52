"""COPY sink: batches rows, upserts them idempotently, then hands the messages to the acker.

Each batch is one transaction: COPY into a per-connection temporary staging table, then
``INSERT … SELECT … ON CONFLICT (message_id) DO NOTHING``. A redelivered message therefore
never makes a second row, and a message is acked only after its row is committed.

A row the database rejects (data or constraint errors, SQLSTATE classes 22 and 23) must not
sink its batch: the batch is bisected until the bad rows are isolated, those are
dead-lettered with the database's reason, and the rest is committed. Any other error
(connection lost, server restarting) is retried with backoff; meanwhile the queues fill
up and the source stops polling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from pipeline.metrics import Stats

from .transform import COLUMNS

__all__ = ["CopySink", "STAGE_TABLE", "create_stage_table"]

log = logging.getLogger("pipeline.sink")

STAGE_TABLE = "pipeline_stage"


def _is_row_error(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and str(getattr(exc, "sqlstate", "") or "")[:2] in ("22", "23")


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)) and not _is_row_error(exc)


async def create_stage_table(conn: asyncpg.Connection, table: str) -> None:
    """Pool ``init`` hook: the staging table lives as long as its connection."""
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {STAGE_TABLE} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )


class CopySink:
    def __init__(
        self, pool: asyncpg.Pool, table: str, inbox: asyncio.Queue, acker: asyncio.Queue, stats: Stats, *,
        batch_size: int, batch_timeout: float, observe_latency: Any = None,
    ) -> None:
        self.pool, self.table, self.inbox, self.acker, self.stats = pool, table, inbox, acker, stats
        self.batch_size, self.batch_timeout = batch_size, batch_timeout
        self.observe_latency = observe_latency
        self.healthy = True
        cols = ", ".join(COLUMNS)
        self._insert = (
            f"INSERT INTO {table} ({cols}) SELECT {cols} FROM pg_temp.{STAGE_TABLE} "
            "ON CONFLICT (message_id) DO NOTHING"
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        get, batch_size = self.inbox.get, self.batch_size
        rows: list[tuple] = []
        msgs: list[dict] = []
        deadline = 0.0
        while True:
            if rows:
                try:
                    item = await asyncio.wait_for(get(), deadline - loop.time())
                except asyncio.TimeoutError:
                    await self.flush(rows, msgs)
                    rows, msgs = [], []
                    continue
            else:
                item = await get()
            if item is None:
                if rows:
                    await self.flush(rows, msgs)
                await self.acker.put(None)
                return
            if not rows:
                deadline = loop.time() + self.batch_timeout
            rows += item[0]
            msgs += item[1]
            if len(rows) >= batch_size:
                await self.flush(rows, msgs)
                rows, msgs = [], []

    async def flush(self, rows: list[tuple], msgs: list[dict]) -> None:
        """Commit ``rows`` (retrying transient errors forever), then pass ``msgs`` on."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=wait_exponential_jitter(multiplier=0.2, max=10, jitter=0.5),
            before_sleep=self._on_retry,
            reraise=True,
        ):
            with attempt:
                inserted, bad = await self._write_isolating(rows, msgs)
        self.healthy = True
        self.stats.batches += 1
        self.stats.inserted += inserted
        self.stats.duplicates += len(rows) - inserted - len(bad)
        if self.observe_latency is not None:
            self.observe_latency(msgs)
        if bad:
            dead_ids = {id(m) for m, _, _ in bad}
            msgs = [m for m in msgs if id(m) not in dead_ids]
            await self.acker.put(("dead", bad))
        if msgs:
            await self.acker.put(("ack", msgs))

    def _on_retry(self, state: Any) -> None:
        self.healthy = False
        self.stats.errors["postgres"] += 1
        exc = state.outcome.exception()
        log.warning(
            "database write failed, retrying",
            extra={"error": f"{type(exc).__name__}: {exc}", "attempt": state.attempt_number,
                   "sleep_s": round(state.next_action.sleep, 2) if state.next_action else None},
        )

    async def _write_isolating(self, rows: list[tuple], msgs: list[dict]) -> tuple[int, list]:
        try:
            return await self._write(rows), []
        except asyncpg.PostgresError as exc:
            if not _is_row_error(exc):
                raise
            if len(rows) == 1:
                state = exc.sqlstate
                log.warning("database rejected a row", extra={"sqlstate": state, "message_id": msgs[0]["MessageId"]})
                return 0, [(msgs[0], f"db.{state}", f"database rejected the row: {state} {type(exc).__name__}: {str(exc)[:200]}")]
        mid = len(rows) // 2
        n1, bad1 = await self._write_isolating(rows[:mid], msgs[:mid])
        n2, bad2 = await self._write_isolating(rows[mid:], msgs[mid:])
        return n1 + n2, bad1 + bad2

    async def _write(self, rows: list[tuple]) -> int:
        async with self.pool.acquire(timeout=30) as conn:
            async with conn.transaction():
                await conn.copy_records_to_table(STAGE_TABLE, records=rows, columns=COLUMNS, schema_name="pg_temp")
                status = await conn.execute(self._insert)
        return int(status.rpartition(" ")[2])


def latency_observer(histogram_observe: Any) -> Any:
    """Per-message end-to-end latency (SentTimestamp to commit), in seconds."""

    def observe(msgs: list[dict]) -> None:
        now_ms = time.time() * 1000
        for m in msgs:
            histogram_observe((now_ms - int(m["Attributes"]["SentTimestamp"])) / 1000)

    return observe
