"""``rekey`` pages by the key the table really has: partitioned tables of both layouts, a real PostgreSQL."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from pipeline.pii.rekey import _DATE_KEY, TOKEN_SQL, page_by_date_sql, rekey, update_by_date_sql
from pipeline.schema import migrate
from pipeline.table.partitions import Layout
from stages.masking import Masker, generate_key

K1, K2 = generate_key("k1"), generate_key("k2")
OLD, NEW = Masker([K1]), Masker([K2, K1])  # NEW: k2 active, k1 kept to read the old tokens
TODAY = dt.date(2026, 11, 15)
NOV, DEC = dt.date(2026, 11, 3), dt.date(2026, 12, 9)


@pytest.fixture
async def conn(pg_dsn: str):  # type: ignore[no-untyped-def]
    c = await asyncpg.connect(pg_dsn)
    await migrate(c, "user_logins", Layout(today=TODAY))
    yield c
    await c.close()


async def seed(conn: asyncpg.Connection) -> None:
    """Rows in two months and in DEFAULT, one without a message id, one without a date, one legacy (not a token)."""
    rows = [(f"u{i}", OLD.mask(f"10.0.0.{i}"), OLD.mask(f"dev-{i}"), day, f"m{i:02d}")
            for i, day in enumerate([NOV] * 7 + [DEC] * 6 + [dt.date(2019, 1, 1)])]
    rows += [("hand", OLD.mask("10.9.9.9"), OLD.mask("dev-hand"), NOV, None),
             ("u50", OLD.mask("10.0.0.50"), OLD.mask("dev-50"), None, "m50"),
             ("legacy", "a" * 64, "b" * 64, DEC, "m99")]
    await conn.executemany("INSERT INTO user_logins (user_id, masked_ip, masked_device_id, create_date, message_id) "
                           "VALUES ($1, $2, $3, $4, $5)", rows)


async def check_all_on_k2(conn: asyncpg.Connection) -> None:
    for r in await conn.fetch("SELECT user_id, masked_ip, masked_device_id FROM user_logins WHERE user_id <> 'legacy'"):
        assert r["masked_ip"].startswith("k2.") and r["masked_device_id"].startswith("k2.")
        if r["user_id"].startswith("u"):
            assert r["masked_ip"] == NEW.mask(f"10.0.0.{r['user_id'][1:]}")  # exactly what a fresh write gets
    assert await conn.fetchval("SELECT masked_ip FROM user_logins WHERE user_id = 'legacy'") == "a" * 64


async def test_rekey_pages_a_date_keyed_partitioned_table_across_months_and_resumes(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval(_DATE_KEY, "user_logins")  # a new table is keyed (create_date, message_id)
    await seed(conn)
    first = await rekey(conn, "user_logins", NEW, batch_size=4, max_batches=2)
    assert first["rows_pending_at_start"] == 16 and first["rows_updated"] == 8 and not first["complete"]
    assert first["rows_remaining"] == 8 and first["rows_skipped_not_tokens"] == 1
    # Key order across partitions: DEFAULT's 2019 row, then November's 7; December's wait.
    done = {r[0] for r in await conn.fetch("SELECT message_id FROM user_logins WHERE masked_ip LIKE 'k2.%'")}
    assert done == {"m13"} | {f"m{i:02d}" for i in range(7)}
    second = await rekey(conn, "user_logins", NEW, batch_size=4)
    assert second["rows_updated"] == 8 and second["complete"]  # December's 6 by the key, the undated by id, 1 by ctid
    assert second["batches"] == 4 and second["values_rekeyed"] == {"k1": {"masked_ip": 8, "masked_device_id": 8}}
    await check_all_on_k2(conn)
    assert (await rekey(conn, "user_logins", NEW))["rows_updated"] == 0  # idempotent


async def test_rekey_pages_by_message_id_on_a_table_of_the_previous_layout(conn: asyncpg.Connection) -> None:
    await conn.execute("DROP INDEX user_logins_create_date_message_id_key")
    await conn.execute("CREATE UNIQUE INDEX user_logins_message_id_create_date_key ON user_logins (message_id, create_date)")
    assert not await conn.fetchval(_DATE_KEY, "user_logins")
    await seed(conn)
    report = await rekey(conn, "user_logins", NEW, batch_size=4)
    assert report["rows_updated"] == 16 and report["complete"]
    await check_all_on_k2(conn)


async def test_the_date_keyed_page_is_an_index_range_and_its_update_prunes_partitions(conn: asyncpg.Connection) -> None:
    await seed(conn)
    await conn.execute("ANALYZE user_logins")
    await conn.execute("SET enable_sort = off")  # a plan that still sorts has no index giving the order
    plan = "\n".join(r[0] for r in await conn.fetch(
        "EXPLAIN " + page_by_date_sql("user_logins", first=False), TOKEN_SQL, "k2.", 4, NOV, "m03"))
    sorts = [line for line in plan.splitlines() if line.strip().removeprefix("->").strip().startswith("Sort  (")]
    assert not sorts and "create_date_message_id" in plan, plan  # a Merge Append of index scans is fine
    plan = "\n".join(r[0] for r in await conn.fetch(
        "EXPLAIN " + update_by_date_sql("user_logins"), ["m01"], [NOV], ["x"], ["y"], NOV, NOV))
    assert "user_logins_2026_11" in plan and "user_logins_2026_12" not in plan and "default" not in plan, plan
