"""CopySink: a row that fails for a reason that may pass is left for redelivery, never blocking its batch."""

from __future__ import annotations

import asyncio

import asyncpg

from pipeline.metrics import Stats
from pipeline.schema import migrate
from pipeline.sample import sample_bodies
from stages.masking import Masker, generate_key
from stages.acker import Committed, DeadLetter, Redeliver
from stages.sink import CopySink, create_stage_table
from stages.transform import to_row

MASKER = Masker([generate_key("s2")])


async def test_row_the_driver_cannot_encode_is_left_for_redelivery(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    await migrate(conn, "user_logins")
    await conn.close()
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2, init=lambda c: create_stage_table(c, "user_logins"))
    try:
        msgs = [{"MessageId": f"m-{i}", "ReceiptHandle": f"h-{i}", "Body": b, "Attributes": {"SentTimestamp": "0"}}
                for i, b in enumerate(sample_bodies(40, seed=61))]
        rows = [to_row(m["Body"], m["MessageId"], 0, MASKER) for m in msgs]
        rows[17] = (rows[17][0], "lone \ud800 surrogate", *rows[17][2:])  # what the transform would never let through
        acks: asyncio.Queue = asyncio.Queue()
        stats = Stats()
        sink = CopySink(pool, "user_logins", asyncio.Queue(), acks, stats, batch_size=100, batch_timeout=0.1)
        await asyncio.wait_for(sink.flush(rows, msgs), 60)
        out = {}
        while not acks.empty():
            item = acks.get_nowait()
            kind = {Committed: "ack", DeadLetter: "dead", Redeliver: "retry"}[type(item)]
            out[kind] = item.entries if isinstance(item, DeadLetter) else item.msgs
        assert [m["MessageId"] for m in out["retry"]] == ["m-17"] and "dead" not in out
        assert len(out["ack"]) == 39 and stats.inserted == 39 and stats.duplicates == 0
        assert sink.healthy
    finally:
        await pool.close()
