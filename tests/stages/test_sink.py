"""CopySink against a real PostgreSQL: idempotent upsert, commit-then-ack, bad-row isolation."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pipeline.metrics import Stats
from pipeline.schema import migrate
from stages.masking import Masker, generate_key
from stages.acker import Committed, DeadLetter, Redeliver
from stages.sink import UPSERT_AFTER_CONFLICT, CopySink, create_stage_table
from stages.transform import to_row
from tests.helpers import wait_until
from pipeline.sample import sample_bodies

MASKER = Masker([generate_key("s1")])


def messages(n: int, offset: int = 0) -> tuple[list[tuple], list[dict]]:
    bodies = sample_bodies(n, seed=offset)
    msgs = [{"MessageId": f"m-{offset + i}", "ReceiptHandle": f"h-{offset + i}", "Body": b,
             "Attributes": {"SentTimestamp": "1764201600000"}} for i, b in enumerate(bodies)]
    rows = [to_row(m["Body"], m["MessageId"], 1764201600000, MASKER) for m in msgs]
    return rows, msgs


@pytest.fixture
async def pool(pg_dsn: str):  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(pg_dsn)
    await migrate(conn, "user_logins")
    await conn.close()
    p = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2, init=lambda c: create_stage_table(c, "user_logins"))
    yield p
    await p.close()


def make_sink(pool: asyncpg.Pool, batch_size: int = 100, write_method: str = "auto",
              ) -> tuple[CopySink, asyncio.Queue, asyncio.Queue, Stats]:
    inbox: asyncio.Queue = asyncio.Queue(10)
    acks: asyncio.Queue = asyncio.Queue()
    stats = Stats()
    return (CopySink(pool, "user_logins", inbox, acks, stats, batch_size=batch_size, batch_timeout=0.1,
                     write_method=write_method), inbox, acks, stats)


def acked(acks: asyncio.Queue) -> tuple[list[dict], list[tuple]]:
    ok, dead = [], []
    while not acks.empty():
        item = acks.get_nowait()
        if item is None:
            continue
        match item:
            case Committed(msgs):
                ok.extend(msgs)
            case DeadLetter(entries):
                dead.extend(entries)
            case Redeliver(msgs):
                dead.extend(msgs)
    return ok, dead


async def test_batches_close_on_size_and_time(pool: asyncpg.Pool) -> None:
    sink, inbox, acks, stats = make_sink(pool, batch_size=25)
    task = asyncio.create_task(sink.run())
    rows, msgs = messages(50)
    for i in range(0, 50, 10):
        await inbox.put((rows[i : i + 10], msgs[i : i + 10]))
    await wait_until(lambda: stats.inserted == 50, 30, "the timer to flush the last 20 rows")
    assert stats.batches == 2  # 30 rows went out on size, the last 20 on the timer, not the sentinel
    await inbox.put(None)
    await task
    ok, dead = acked(acks)
    assert len(ok) == 50 and not dead
    assert await pool.fetchval("SELECT count(*) FROM user_logins") == 50


async def test_redelivered_messages_make_no_second_row(pool: asyncpg.Pool) -> None:
    sink, _, acks, stats = make_sink(pool)
    rows, msgs = messages(20)
    await sink.flush(rows, msgs)
    await sink.flush(rows[:5] + rows[:5], msgs[:5] + msgs[:5])  # redelivered, twice in one batch
    assert stats.inserted == 20 and stats.duplicates == 10
    ok, _ = acked(acks)
    assert len(ok) == 30  # the redundant copies are acked too
    assert await pool.fetchval("SELECT count(*) FROM user_logins") == 20


async def test_direct_copy_until_a_batch_meets_a_stored_key(pool: asyncpg.Pool) -> None:
    sink, _, acks, stats = make_sink(pool)
    rows, msgs = messages(30)
    # CASE: fresh rows -> written by a direct COPY, no conflict counted
    await sink.flush(rows[:10], msgs[:10])
    assert stats.inserted == 10 and stats.copy_conflicts == 0
    # CASE: a batch with one stored key (a redelivery) -> the COPY fails as a whole, the batch is
    # written again as an upsert: its fresh rows stored, the stored one counted as a duplicate
    await sink.flush(rows[9:20], msgs[9:20])
    assert (stats.inserted, stats.duplicates, stats.copy_conflicts) == (20, 1, 1)
    # CASE: the next batches go through the upsert (a redelivery run), then back to COPY
    for i in range(UPSERT_AFTER_CONFLICT):
        await sink.flush(rows[20 + i % 10: 21 + i % 10], msgs[20 + i % 10: 21 + i % 10])
    assert stats.copy_conflicts == 1 and stats.inserted == 30 and stats.duplicates == 1 + UPSERT_AFTER_CONFLICT - 10
    await sink.flush(rows[:1], msgs[:1])
    assert stats.copy_conflicts == 2  # back to a direct COPY, which met the stored key again
    # CASE: one key twice in one fresh batch -> one row, one duplicate
    more, more_msgs = messages(3, offset=100)
    sink._upsert_next = 0
    await sink.flush(more + more[:1], more_msgs + more_msgs[:1])
    assert stats.copy_conflicts == 3 and await pool.fetchval("SELECT count(*) FROM user_logins") == 33
    ok, dead = acked(acks)
    assert not dead and len(ok) == 10 + 11 + UPSERT_AFTER_CONFLICT + 1 + 4


async def test_upsert_method_never_copies_into_the_table(pool: asyncpg.Pool) -> None:
    # CASE: write_method="upsert" -> duplicates are skipped by ON CONFLICT, no COPY ever fails on the key
    sink, _, _, stats = make_sink(pool, write_method="upsert")
    rows, msgs = messages(10)
    await sink.flush(rows, msgs)
    await sink.flush(rows, msgs)
    assert (stats.inserted, stats.duplicates, stats.copy_conflicts) == (10, 10, 0)


@pytest.mark.parametrize("write_method", ["auto", "upsert"])
async def test_rows_the_database_rejects_are_isolated(pool: asyncpg.Pool, write_method: str) -> None:
    await pool.execute("ALTER TABLE user_logins ADD CONSTRAINT no_symbian CHECK (device_type <> 'symbian')")
    sink, _, acks, stats = make_sink(pool, write_method=write_method)
    rows, msgs = messages(50)
    bad = {7, 31}
    for i in bad:
        rows[i] = rows[i][:2] + ("symbian",) + rows[i][3:]
    await sink.flush(rows, msgs)
    ok, dead = acked(acks)
    assert stats.inserted == 48 and len(ok) == 48
    assert sorted(m["MessageId"] for m, _, _ in dead) == ["m-31", "m-7"]
    assert all(rule == "db.23514" and "23514" in reason for _, rule, reason in dead)
    assert await pool.fetchval("SELECT count(*) FROM user_logins") == 48


async def test_two_batches_commit_at_once_and_hand_off_in_batch_order(pool: asyncpg.Pool, pg_dsn: str) -> None:
    """While the first batch waits on a lock, the second commits; neither is acked before the first is."""
    sink, inbox, acks, stats = make_sink(pool, batch_size=10)  # two transactions in flight (the default)
    rows, msgs = messages(20)
    blocker = await asyncpg.connect(pg_dsn)
    try:
        hold = blocker.transaction()
        await hold.start()  # an uncommitted row with batch 1's first key: its upsert must wait for us
        await blocker.execute("INSERT INTO user_logins (message_id, create_date) VALUES ($1, $2)", rows[0][0], rows[0][7])
        task = asyncio.create_task(sink.run())
        await inbox.put((rows, msgs))  # cut into two batches of 10
        second = [m["MessageId"] for m in msgs[10:]]
        deadline = asyncio.get_running_loop().time() + 30
        while await blocker.fetchval("SELECT count(*) FROM user_logins WHERE message_id = ANY($1)", second) < 10:
            assert asyncio.get_running_loop().time() < deadline, "the second batch never committed"
            await asyncio.sleep(0.02)
        assert acks.empty() and stats.inserted == 0  # committed, but handed on only after the first batch
        await hold.rollback()
        await inbox.put(None)
        await task
    finally:
        await blocker.close()
    first, second_ack = acks.get_nowait(), acks.get_nowait()
    assert isinstance(first, Committed) and [m["MessageId"] for m in first.msgs] == [m["MessageId"] for m in msgs[:10]]
    assert isinstance(second_ack, Committed) and [m["MessageId"] for m in second_ack.msgs] == second
    assert stats.inserted == 20 and stats.batches == 2
    assert await pool.fetchval("SELECT count(*) FROM user_logins") == 20
