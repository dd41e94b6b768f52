"""``schema.inspect``: the read-only compatibility check behind ``check``."""

from __future__ import annotations

import uuid

import asyncpg

from pipeline.schema import Layout, inspect, migrate
from tests.helpers import TAKEHOME_DDL


async def test_inspect_absent_takehome_and_current(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        absent = await inspect(conn, "user_logins")
        assert (absent.exists, absent.ok, absent.problems) == (False, False, [])
        assert absent.pending and absent.pending[0].startswith("CREATE TABLE")

        await conn.execute(TAKEHOME_DDL)
        takehome = await inspect(conn, "user_logins")
        assert takehome.ok and takehome.schema == "public"
        pending = " ".join(takehome.pending)
        assert "app_version" in pending and "ADD COLUMN message_id" in pending and "UNIQUE INDEX" in pending
        assert await migrate(conn, "user_logins")  # inspect changed nothing: migrate still has work

        current = await inspect(conn, "user_logins")
        assert current.ok and current.pending == [] and current.problems == []
    finally:
        await conn.close()


async def test_inspect_names_what_is_incompatible(pg_dsn: str) -> None:
    reader = f"reader_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, "user_logins", Layout(partitioned=False))  # a partition key's type cannot change
        await conn.execute("ALTER TABLE user_logins ADD COLUMN tenant text NOT NULL")
        await conn.execute("ALTER TABLE user_logins ALTER COLUMN create_date TYPE text")
        report = await inspect(conn, "user_logins")
        assert report.exists and not report.ok
        text = "; ".join(report.problems)
        assert "tenant is NOT NULL without a default" in text and "create_date is text" in text

        await conn.execute(f"CREATE ROLE {reader} LOGIN")
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {reader}")
        await conn.execute("REVOKE TEMP ON DATABASE " + await conn.fetchval("SELECT current_database()") + " FROM PUBLIC")
        await conn.execute(f"SET ROLE {reader}")
        try:
            assert (await inspect(conn, "user_logins")).problems == ["the user has no privileges on the table"]
            await conn.execute("RESET ROLE")
            await conn.execute(f"GRANT SELECT ON user_logins TO {reader}")
            await conn.execute(f"SET ROLE {reader}")
            as_reader = "; ".join((await inspect(conn, "user_logins")).problems)
        finally:
            await conn.execute("RESET ROLE")
        assert "may not INSERT" in as_reader and "temporary tables" in as_reader and "does not own it" in as_reader
    finally:
        await conn.execute(f"DROP OWNED BY {reader}")
        await conn.execute(f"DROP ROLE IF EXISTS {reader}")
        await conn.close()
