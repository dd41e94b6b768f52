"""COPY sink: batches rows, upserts them idempotently, then hands the messages to the acker.

Each batch is one transaction, written one of two ways (``write_method``):

- ``upsert``: COPY into a per-connection temporary staging table, then ``INSERT … SELECT …
  ON CONFLICT DO NOTHING`` (the table's unique key). A redelivered message never makes a
  second row.
- ``auto`` (the default): COPY straight into the table, which costs the database about a
  third less per row than the staged upsert (no second copy of the rows, no INSERT executor),
  and is right whenever the batch holds no row already stored, which is almost always: a
  duplicate is a redelivery, a redrive or SQS's at-least-once. A batch that does meet a stored
  key fails as a whole on the unique index and is written again through the staged upsert,
  and so are the next ``UPSERT_AFTER_CONFLICT`` batches, since redeliveries come in runs (after
  a crash or a visibility timeout). Either way the row key is enforced by the index, never by
  this process, and a message is acked only after its row is committed.

A row the database rejects (data or constraint errors, SQLSTATE classes 22 and 23) must not
sink its batch: the batch is bisected until the bad rows are isolated, those are
dead-lettered with the database's reason, and the rest is committed. A row that fails
for a reason that may pass (a trigger or routine raising, a client-side encoding error) is
isolated the same way but left for redelivery: it comes back with a higher
``ApproximateReceiveCount`` and, if it keeps failing, the transformer dead-letters it as
poison. Any other error (connection lost, server restarting, the table gone) is retried
with backoff; meanwhile the queues fill up and the source stops polling.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception

from . import backoff, events
from .acker import Committed, DeadLetter, Redeliver
from .parts import log_id
from .outage import Outage
from .pgerrors import PgFault, classify, sqlstate, unanswered
from .stats import Stats
from .transform import COLUMNS

__all__ = ["CopySink", "STAGE_TABLE", "UPSERT_AFTER_CONFLICT", "WRITE_METHODS", "create_stage_table", "upsert_sql"]

STAGE_TABLE = "pipeline_stage"
WRITE_METHODS = ("auto", "upsert")
UPSERT_AFTER_CONFLICT = 64  # batches written through the staged upsert after one met a stored key


def _is_transient(exc: BaseException) -> bool:
    return classify(exc) is PgFault.TRANSIENT


def _wait(state: Any) -> float:
    """No wait of its own after an unanswered attempt: the shared outage paces the next one."""
    exc = state.outcome.exception()
    return 0.0 if exc is not None and unanswered(exc) else backoff.wait(state)


def upsert_sql(table: str) -> str:
    """The statement that moves a committed batch from the staging table into ``table``, idempotently.

    One definition: ``bench``'s raw COPY baseline runs it too, so the ceiling it reports cannot
    drift from what the sink really does. No conflict target: the row key is the table's unique
    index, ``(message_id)`` on an unpartitioned table and ``(message_id, create_date)`` on a
    partitioned one (the partition key must be in it); either way a redelivery is skipped.
    """
    cols = ", ".join(COLUMNS)
    return f"INSERT INTO {table} ({cols}) SELECT {cols} FROM pg_temp.{STAGE_TABLE} ON CONFLICT DO NOTHING"


async def create_stage_table(conn: asyncpg.Connection, table: str) -> None:
    """Pool ``init`` hook: the staging table lives as long as its connection."""
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {STAGE_TABLE} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )


class CopySink:
    def __init__(
        self, pool: asyncpg.Pool, table: str, inbox: asyncio.Queue, acker: asyncio.Queue, stats: Stats, *,
        batch_size: int, batch_timeout: float, concurrency: int = 2, write_method: str = "auto",
        outage: Outage | None = None,
    ) -> None:
        if write_method not in WRITE_METHODS:
            raise ValueError(f"write_method must be one of {WRITE_METHODS}, not {write_method!r}")
        self.pool, self.table, self.inbox, self.acker, self.stats = pool, table, inbox, acker, stats
        self.batch_size, self.batch_timeout = batch_size, batch_timeout
        self.concurrency = max(1, concurrency)  # batch transactions at once (each holds a pool connection)
        self.healthy = True
        # The batches under way meet a server that is gone as one: one probe per backoff step.
        self.outage = outage or Outage("postgres", stats, unanswered=unanswered)
        self._insert = upsert_sql(table)
        self._copy_to = table.lower()  # COPY quotes its table name; the SQL above folds an unquoted one
        # Batches still to go through the staged upsert; "upsert" never leaves it.
        self._upsert_next = -1 if write_method == "upsert" else 0

    async def run(self) -> None:
        """Batch rows by size or age; up to ``concurrency`` batches commit at once while the next one fills.

        Why overlap: a batch's round trip (COPY, then the upsert, then COMMIT) leaves this process
        idle and the database working, then the reverse; with two transactions in flight each side
        works while the other does. Overlapping keys are safe (``ON CONFLICT DO NOTHING``; a
        deadlock between two batches is transient and retried). Hand-offs to the acker stay in
        batch order (each batch waits for the one before it), so acks and dead letters leave
        exactly as they did with one transaction at a time, and a message is still acked only
        after its row is committed.
        """
        loop = asyncio.get_running_loop()
        inbox, batch_size = self.inbox, self.batch_size
        get, get_nowait = inbox.get, inbox.get_nowait
        rows: list[tuple] = []
        msgs: list[dict] = []
        deadline = 0.0
        writing: deque[asyncio.Task] = deque()  # oldest first

        async def start(rows: list[tuple], msgs: list[dict]) -> None:
            while len(writing) >= self.concurrency:
                await writing.popleft()  # the oldest batch first (re-raises what it raised)
            writing.append(asyncio.create_task(self.flush(rows, msgs, after=writing[-1] if writing else None)))

        try:
            while True:
                if not inbox.empty():
                    item = get_nowait()
                elif rows:
                    try:
                        item = await asyncio.wait_for(get(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        await start(rows, msgs)
                        rows, msgs = [], []
                        continue
                else:
                    item = await get()
                if item is None:
                    if rows:
                        await start(rows, msgs)
                    while writing:
                        await writing.popleft()
                    await self.acker.put(None)
                    return
                if not rows:
                    deadline = loop.time() + self.batch_timeout
                rows += item[0]
                msgs += item[1]
                # One receive of multi-event messages may bring thousands of rows: cut exact batches.
                while len(rows) >= batch_size:
                    await start(rows[:batch_size], msgs[:batch_size])
                    rows, msgs = rows[batch_size:], msgs[batch_size:]
                    if rows:
                        deadline = loop.time() + self.batch_timeout
        finally:
            for task in writing:
                if not task.done():
                    task.cancel()

    async def flush(self, rows: list[tuple], msgs: list[dict], *, after: asyncio.Task | None = None) -> None:
        """Commit ``rows`` (retrying transient errors forever), then, once ``after`` (the batch
        before) has handed its messages on, pass ``msgs`` on."""
        outage = self.outage
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=_wait,
            before_sleep=self._on_retry,
            reraise=True,
        ):
            with attempt:
                ticket = await outage.admit()
                try:
                    inserted, bad, later = await self._write_isolating(rows, msgs)
                except Exception as exc:
                    outage.settled(ticket, exc)
                    raise
                outage.settled(ticket)
        if after is not None:
            await after
        self.healthy = True
        self.stats.batches += 1
        self.stats.inserted += inserted
        self.stats.duplicates += len(rows) - inserted - len(bad) - len(later)
        self.stats.observe_commit(msgs)  # batch size and latency histograms: /metrics, and what bench reads
        if bad or later:
            out_ids = {id(m) for m, _, _ in bad} | {id(m) for m in later}
            msgs = [m for m in msgs if id(m) not in out_ids]
        if later:
            await self.acker.put(Redeliver(later))
        if bad:
            await self.acker.put(DeadLetter(bad))
        if msgs:
            await self.acker.put(Committed(msgs))

    def _on_retry(self, state: Any) -> None:
        self.healthy = False
        exc = state.outcome.exception()
        paced = unanswered(exc) or not state.next_action  # by the shared outage: no sleep of its own
        events.db_write_failed(self.stats, exc, state.attempt_number, None if paced else state.next_action.sleep)

    async def _write_isolating(self, rows: list[tuple], msgs: list[dict]) -> tuple[int, list, list]:
        """(rows inserted, dead letters, messages left for redelivery); transient errors raise."""
        try:
            return await self._write(rows), [], []
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised unless it is about rows
            fault = classify(exc)
            match fault:
                case PgFault.TRANSIENT | PgFault.FATAL:
                    raise
                case PgFault.ROW | PgFault.SUSPECT:
                    pass
            if len(rows) == 1:
                state = sqlstate(exc) or "client"
                if fault is PgFault.SUSPECT:
                    events.row_left_for_redelivery(self.stats, state, exc, log_id(msgs[0]))
                    return 0, [], [msgs[0]]
                events.row_rejected_by_database(state, log_id(msgs[0]))
                return 0, [(msgs[0], f"db.{state}", f"database rejected the row: {state} {type(exc).__name__}: {str(exc)[:200]}")], []
        mid = len(rows) // 2
        n1, bad1, later1 = await self._write_isolating(rows[:mid], msgs[:mid])
        n2, bad2, later2 = await self._write_isolating(rows[mid:], msgs[mid:])
        return n1 + n2, bad1 + bad2, later1 + later2

    async def _write(self, rows: list[tuple]) -> int:
        """Rows inserted: a direct COPY while batches meet no stored key, else the staged upsert."""
        async with self.pool.acquire(timeout=30) as conn:
            if self._upsert_next == 0:
                try:
                    async with conn.transaction():
                        await conn.copy_records_to_table(self._copy_to, records=rows, columns=COLUMNS)
                    return len(rows)
                # a stored key (or a user's exclusion constraint, which DO NOTHING also skips): this
                # batch, and the next ones, upsert
                except (asyncpg.UniqueViolationError, asyncpg.ExclusionViolationError):
                    self._upsert_next = UPSERT_AFTER_CONFLICT
                    events.copy_met_stored_key(self.stats)
            elif self._upsert_next > 0:
                self._upsert_next -= 1
            async with conn.transaction():
                await conn.copy_records_to_table(STAGE_TABLE, records=rows, columns=COLUMNS, schema_name="pg_temp")
                status = await conn.execute(self._insert)
        return int(status.rpartition(" ")[2])

