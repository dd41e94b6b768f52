"""Monthly partitions, retention and erasure against a real PostgreSQL (the calendar is pinned)."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from pipeline.schema import migrate, plan
from pipeline.table.erase import erase
from pipeline.table.partitions import Layout, list_partitions
from pipeline.table.retention import retention
from stages.sink import STAGE_TABLE, create_stage_table, upsert_sql
from stages.transform import COLUMNS
from tests.helpers import TAKEHOME_DDL

TODAY = dt.date(2026, 11, 15)
LAYOUT = Layout(today=TODAY)


def row(user: str, day: dt.date, mid: str | None) -> tuple:
    values = {"user_id": user, "device_type": "ios", "masked_ip": "k.ip", "masked_device_id": "k.dev",
              "locale": None, "app_version": "1.0", "create_date": day, "message_id": mid}
    return tuple(values[c] for c in COLUMNS)


async def insert(conn: asyncpg.Connection, rows: list[tuple]) -> int:
    """What the sink does: COPY into staging, then the upsert; returns the rows inserted."""
    await create_stage_table(conn, "user_logins")
    async with conn.transaction():
        await conn.copy_records_to_table(STAGE_TABLE, records=rows, columns=COLUMNS, schema_name="pg_temp")
        return int((await conn.execute(upsert_sql("user_logins"))).rpartition(" ")[2])


async def where(conn: asyncpg.Connection) -> dict[str, int]:
    return {r["p"]: r["n"] for r in await conn.fetch(
        "SELECT tableoid::regclass::text AS p, count(*) AS n FROM user_logins GROUP BY 1")}


@pytest.fixture
async def conn(pg_dsn: str):  # type: ignore[no-untyped-def]
    c = await asyncpg.connect(pg_dsn)
    yield c
    await c.close()


async def test_fresh_table_is_partitioned_with_months_ahead_and_a_default(conn: asyncpg.Connection) -> None:
    ran = await migrate(conn, "user_logins", LAYOUT)
    assert ran[0].startswith("CREATE TABLE user_logins (") and "PARTITION BY RANGE (create_date)" in ran[0]
    assert await plan(conn, "user_logins", LAYOUT) == []
    parts = await list_partitions(conn, "user_logins")
    assert [p.name for p in parts] == ["user_logins_2026_11", "user_logins_2026_12", "user_logins_2027_01",
                                       "user_logins_default"]
    idx = {r[0] for r in await conn.fetch("SELECT indexdef FROM pg_indexes WHERE tablename = 'user_logins_2026_11'")}
    assert any("btree (create_date, message_id)" in i and "UNIQUE" in i for i in idx)  # a day's inserts: one region
    assert any("USING hash (masked_ip)" in i for i in idx) and any("USING hash (masked_device_id)" in i for i in idx)
    # A month later, maintenance (the same migrate) adds the next month ahead, and only that.
    later = Layout(today=dt.date(2026, 12, 2))
    assert await plan(conn, "user_logins", later) == [
        "CREATE TABLE user_logins_2027_02 PARTITION OF user_logins FOR VALUES FROM ('2027-02-01') TO ('2027-03-01')"]
    await migrate(conn, "user_logins", later)
    assert await plan(conn, "user_logins", later) == []


async def test_rows_outside_the_months_go_to_default_and_move_out_when_their_month_is_created(conn: asyncpg.Connection) -> None:
    await migrate(conn, "user_logins", LAYOUT)
    far = dt.date(2027, 4, 9)
    assert await insert(conn, [row("u1", TODAY, "m1"), row("u2", far, "m2"), row("u3", dt.date(2019, 1, 1), "m3")]) == 3
    assert await where(conn) == {"user_logins_2026_11": 1, "user_logins_default": 2}
    changes = await migrate(conn, "user_logins", Layout(today=dt.date(2027, 2, 1)))  # 2027-02..04: April's row moves
    assert any("ATTACH PARTITION user_logins_2027_04" in c for c in changes)
    assert await where(conn) == {"user_logins_2026_11": 1, "user_logins_2027_04": 1, "user_logins_default": 1}
    assert await insert(conn, [row("u2", far, "m2")]) == 0  # still deduplicated where it now lives


async def test_a_redelivery_is_stored_once_within_its_partition(conn: asyncpg.Connection) -> None:
    await migrate(conn, "user_logins", LAYOUT)
    batch = [row(f"u{i}", TODAY, f"m{i}") for i in range(5)]
    assert await insert(conn, batch) == 5
    assert await insert(conn, batch[1:3] + [row("u9", TODAY, "m9")]) == 1  # redelivered ones skipped, new one kept
    assert await insert(conn, [batch[0], batch[0]]) == 0  # twice in one batch too
    assert await where(conn) == {"user_logins_2026_11": 6}


async def test_retention_drops_old_months_and_trims_the_straddling_one_and_default(conn: asyncpg.Connection) -> None:
    months = [dt.date(2025, 10, 1), dt.date(2026, 5, 1), dt.date(2026, 6, 1)]
    await migrate(conn, "user_logins", Layout(today=months[0], ahead=8))  # 2025-10 .. 2026-06
    rows = [row("old", dt.date(2025, 10, 20), "a"),  # 13 months ago: its partition goes
            row("mid", dt.date(2026, 5, 10), "b"),  # before the cutoff (2026-05-20), in a straddling month
            row("keep", dt.date(2026, 5, 25), "c"),  # after it, same month: kept
            row("keep", dt.date(2026, 8, 15), "d"),  # three months ago: kept
            row("ancient", dt.date(2019, 3, 1), "e"),  # in DEFAULT, old
            row("future", dt.date(2027, 9, 1), "f")]  # in DEFAULT, new
    await migrate(conn, "user_logins", LAYOUT)
    assert await insert(conn, rows) == 6
    dry = await retention(conn, "user_logins", 180, today=TODAY, dry_run=True)
    assert dry["cutoff"] == "2026-05-20" and dry["rows_deleted_total"] == 2
    assert await conn.fetchval("SELECT count(*) FROM user_logins") == 6  # a dry run changes nothing
    report = await retention(conn, "user_logins", 180, today=TODAY, batch_size=1)
    assert "user_logins_2025_10" in report["partitions_dropped"] and "user_logins_2026_05" not in report["partitions_dropped"]
    assert report["rows_deleted"] == {"user_logins_2026_05": 1, "user_logins_default": 1}
    kept = {(r[0], r[1]) for r in await conn.fetch("SELECT user_id, create_date FROM user_logins")}
    assert kept == {("keep", dt.date(2026, 5, 25)), ("keep", dt.date(2026, 8, 15)), ("future", dt.date(2027, 9, 1))}
    again = await retention(conn, "user_logins", 180, today=TODAY)
    assert again["partitions_dropped"] == [] and again["rows_deleted_total"] == 0  # idempotent


async def test_retention_on_an_unpartitioned_table_deletes_in_batches(conn: asyncpg.Connection) -> None:
    await conn.execute(TAKEHOME_DDL)
    await migrate(conn, "user_logins", LAYOUT)
    await conn.execute("INSERT INTO user_logins (user_id, create_date) SELECT 'u', DATE '2026-01-01' FROM generate_series(1, 25)")
    await conn.execute("INSERT INTO user_logins (user_id, create_date) VALUES ('u', DATE '2026-11-01'), ('u', NULL)")
    report = await retention(conn, "user_logins", 30, today=TODAY, batch_size=10)
    assert report["rows_deleted"] == {"user_logins": 25} and report["partitions_dropped"] == []
    assert await conn.fetchval("SELECT count(*) FROM user_logins") == 2  # undated rows cannot be aged: kept


async def test_erase_removes_a_users_rows_across_partitions_and_nobody_elses(conn: asyncpg.Connection) -> None:
    await migrate(conn, "user_logins", LAYOUT)
    await insert(conn, [row("alice", TODAY, "1"), row("alice", dt.date(2026, 12, 3), "2"),
                        row("alice", dt.date(2030, 1, 1), "3"), row("bob", TODAY, "4"), row("carol", TODAY, "5")])
    report = await erase(conn, "user_logins", ["alice", "carol", "nobody"], batch_size=2)
    assert report == {"table": "user_logins", "users": 3, "rows_deleted": 4, "by_partition": {
        "user_logins_2026_11": 2, "user_logins_2026_12": 1, "user_logins_default": 1}}
    assert [r[0] for r in await conn.fetch("SELECT user_id FROM user_logins")] == ["bob"]


async def test_a_partitioned_table_of_the_previous_layout_keeps_its_indexes(conn: asyncpg.Connection) -> None:
    """Key (message_id, create_date) and btrees on the masked columns count as present: nothing is rebuilt."""
    await conn.execute("CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip text, "
                       "masked_device_id text, locale varchar(32), app_version varchar(32), create_date date, "
                       "message_id varchar(128)) PARTITION BY RANGE (create_date)")
    await conn.execute("CREATE UNIQUE INDEX user_logins_message_id_create_date_key ON user_logins (message_id, create_date)")
    await conn.execute("CREATE INDEX user_logins_masked_ip_idx ON user_logins (masked_ip)")
    changes = await migrate(conn, "user_logins", LAYOUT)
    assert not any("UNIQUE" in c or "masked_ip" in c for c in changes), changes
    assert "CREATE INDEX user_logins_masked_device_id_idx ON user_logins USING hash (masked_device_id)" in changes
    await insert(conn, [row("u", TODAY, "m")])
    assert await insert(conn, [row("u", TODAY, "m")]) == 0  # ON CONFLICT without target: either key order
    assert await plan(conn, "user_logins", LAYOUT) == []


async def test_a_legacy_table_stays_unpartitioned_and_a_new_one_can_be_plain(conn: asyncpg.Connection) -> None:
    await conn.execute(TAKEHOME_DDL)
    changes = await migrate(conn, "user_logins", LAYOUT)
    assert len(changes) == 5 and not any("PARTITION" in c for c in changes)
    await insert(conn, [row("u", TODAY, "m")])
    assert await insert(conn, [row("u", TODAY, "m")]) == 0  # ON CONFLICT without target: the message_id index
    assert await migrate(conn, "plain", Layout(partitioned=False, today=TODAY)) == [
        "CREATE TABLE plain (user_id character varying(128), device_type character varying(32), masked_ip text, "
        "masked_device_id text, locale character varying(32), app_version character varying(32), create_date date, "
        "message_id character varying(128))",
        "CREATE UNIQUE INDEX plain_message_id_key ON plain (message_id)"]


async def test_periodic_maintenance_adds_months_and_applies_retention(pg_dsn: str, conn: asyncpg.Connection) -> None:
    from pipeline.settings import Settings
    from pipeline.table.maintenance import maintain

    settings = Settings(postgres={"dsn": pg_dsn, "retention_days": 30, "partitions_ahead": 1})
    first = await maintain(settings, today=dt.date(2026, 1, 5))
    assert len(first["changes"]) == 7 and first["retention"]["rows_deleted_total"] == 0  # table, key, 2 indexes, 3
    await insert(conn, [row("u", dt.date(2026, 1, 6), "a"), row("u", dt.date(2026, 2, 20), "b")])
    later = await maintain(settings, today=dt.date(2026, 3, 10))
    assert later["changes"] == ["CREATE TABLE user_logins_2026_03 PARTITION OF user_logins FOR VALUES FROM "
                                "('2026-03-01') TO ('2026-04-01')",
                                "CREATE TABLE user_logins_2026_04 PARTITION OF user_logins FOR VALUES FROM "
                                "('2026-04-01') TO ('2026-05-01')"]
    assert later["retention"]["partitions_dropped"] == ["user_logins_2026_01"]
    assert [r[0] for r in await conn.fetch("SELECT message_id FROM user_logins")] == ["b"]
