"""``migrate --partition`` on a populated takehome table while a pipeline keeps writing to it.

The conversion runs a batch at a time (each call resumes from the progress row, as after an
interruption) while new messages arrive, and messages that an earlier consumer stored but never
deleted come back: every legacy row and every message ends up stored exactly once, and the
redeliveries are deduplicated across the swap.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from pipeline.metrics import Stats
from pipeline.runner import Runtime, run
from pipeline.sample import sample_bodies
from pipeline.schema import migrate
from pipeline.table.convert import convert
from pipeline.table.partitions import Layout, relkind
from stages.masking import Masker, generate_key, parse_key
from stages.sink import CopySink, create_stage_table
from stages.transform import to_row
from tests.helpers import TAKEHOME_DDL, make_settings, send_bodies, wait_until

KEY = generate_key("conv").encode()
LEGACY = 2000


async def _store_without_deleting(queues, dsn: str, n: int) -> None:  # type: ignore[no-untyped-def]
    """A consumer that committed ``n`` rows and died before deleting their messages."""
    got: list[dict] = []
    while len(got) < n:
        got += queues.client.receive_message(
            QueueUrl=queues.queue_url, MaxNumberOfMessages=min(10, n - len(got)), VisibilityTimeout=3,
            MessageSystemAttributeNames=["SentTimestamp"]).get("Messages", [])
    masker = Masker([parse_key(KEY)])
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, init=lambda c: create_stage_table(c, "user_logins"))
    sink = CopySink(pool, "user_logins", asyncio.Queue(), asyncio.Queue(), Stats(), batch_size=100, batch_timeout=1)
    await sink.flush([to_row(m["Body"], m["MessageId"], int(m["Attributes"]["SentTimestamp"]), masker) for m in got], got)
    await pool.close()


async def test_online_conversion_loses_and_duplicates_nothing_while_a_pipeline_writes(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(TAKEHOME_DDL)
        await conn.execute(  # takehome rows over a year and a half, some undated
            "INSERT INTO user_logins SELECT 'legacy-' || i, 'ios', md5(i::text), md5((i + 1)::text), NULL, 2, "
            f"CASE WHEN i % 50 = 0 THEN NULL ELSE current_date - (i % 540) END FROM generate_series(1, {LEGACY}) i")
        await migrate(conn, "user_logins", Layout())
        ids = send_bodies(queues.client, queues.queue_url, sample_bodies(200, seed=1))
        await _store_without_deleting(queues, pg_dsn, 10)

        settings = make_settings(queues, pg_dsn, KEY)
        rt, stop = Runtime(settings), asyncio.Event()
        pipeline = asyncio.create_task(run(settings, stop=stop, runtime=rt))
        await wait_until(lambda: rt.stats.inserted > 0, what="the pipeline writing")

        layout, rounds, result = Layout(), 0, {"status": ""}
        bodies = iter(sample_bodies(2000, seed=2)[200:])
        while result["status"] != "converted":  # one batch per call: each call resumes the last one
            result = await convert(conn, "user_logins", layout, batch_blocks=2, max_batches=1)
            rounds += 1
            ids += await asyncio.to_thread(send_bodies, queues.client, queues.queue_url, [next(bodies) for _ in range(20)])
        assert rounds > 5 and result["resumed"] and result["rows_copied"] >= LEGACY, result
        assert await relkind(conn, "user_logins") == "p"
        defs = {r[0]: r[1] for r in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'user_logins'")}
        assert defs == {  # the new layout, already named for the table it became
            "user_logins_create_date_message_id_key": "CREATE UNIQUE INDEX user_logins_create_date_message_id_key ON "
                                                      "ONLY public.user_logins USING btree (create_date, message_id)",
            "user_logins_masked_ip_idx": "CREATE INDEX user_logins_masked_ip_idx ON ONLY public.user_logins "
                                         "USING hash (masked_ip)",
            "user_logins_masked_device_id_idx": "CREATE INDEX user_logins_masked_device_id_idx ON ONLY "
                                                "public.user_logins USING hash (masked_device_id)"}, defs
        ids += await asyncio.to_thread(send_bodies, queues.client, queues.queue_url, [next(bodies) for _ in range(50)])

        async def stored() -> int:
            return await conn.fetchval("SELECT count(*) FROM user_logins WHERE message_id IS NOT NULL")

        deadline = time.monotonic() + 30
        while (await stored() < len(ids) or rt.stats.duplicates < 10) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stop.set()
        summary = await pipeline
        assert summary["duplicates"] >= 10, summary  # the dead consumer's messages, redelivered across the swap
        assert await conn.fetchval("SELECT count(*) FROM user_logins WHERE message_id IS NULL") == LEGACY
        got = [r[0] for r in await conn.fetch("SELECT message_id FROM user_logins WHERE message_id IS NOT NULL")]
        assert len(got) == len(set(got)) and set(got) == set(ids), (len(got), len(set(got)), len(ids))
        assert await conn.fetchval("SELECT count(*) FROM user_logins_default") < LEGACY  # months exist for old rows
        assert await relkind(conn, "user_logins_unpartitioned") is None  # the old table is gone
        again = await convert(conn, "user_logins", layout)
        assert again["status"] == "already partitioned"
    finally:
        await conn.close()
