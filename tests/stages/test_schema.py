"""Migration against a real PostgreSQL: fresh create, takehome table adapted without loss."""

from __future__ import annotations

import asyncpg

from pipeline.schema import migrate
from tests.helpers import TAKEHOME_DDL


async def test_creates_table_and_is_idempotent(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await migrate(conn, "user_logins")
        assert await migrate(conn, "user_logins") == []
        cols = {r["column_name"]: r["data_type"] for r in await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'user_logins'")}
        assert cols["app_version"] == "character varying" and "message_id" in cols
    finally:
        await conn.close()


async def test_adapts_the_takehome_table_keeping_rows(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(TAKEHOME_DDL)
        await conn.execute(
            "INSERT INTO user_logins VALUES ('u1', 'ios', 'abc', 'def', NULL, 2, '2020-01-01'),"
            " ('u2', 'android', 'ghi', 'jkl', 'RU', 230, '2020-01-02')")
        changes = await migrate(conn, "user_logins")
        assert any("app_version" in c for c in changes) and any("message_id" in c for c in changes)
        rows = await conn.fetch("SELECT user_id, app_version, masked_ip, message_id FROM user_logins ORDER BY user_id")
        assert [(r["user_id"], r["app_version"], r["masked_ip"], r["message_id"]) for r in rows] == [
            ("u1", "2", "abc", None), ("u2", "230", "ghi", None)]
        await conn.execute("INSERT INTO user_logins (user_id, app_version, message_id) VALUES ('u3', '0.96', 'm')")
        assert await conn.fetchval("SELECT app_version FROM user_logins WHERE user_id = 'u3'") == "0.96"
        assert await migrate(conn, "user_logins") == []
    finally:
        await conn.close()
