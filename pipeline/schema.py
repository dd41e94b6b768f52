"""The ``user_logins`` schema, and the migration that adapts the takehome's table in place.

The takehome pre-creates the table with ``app_version integer``, ``varchar(256)`` masked
columns and no message id. Migration keeps every existing row: it converts
``app_version`` to text (``2`` stays ``"2"``), widens the masked columns for AES-SIV
tokens, and adds ``message_id`` with a unique index for idempotent upserts (existing rows
keep a NULL id, which the unique index allows).
"""

from __future__ import annotations

import asyncpg

__all__ = ["migrate", "MIGRATION_LOCK"]

MIGRATION_LOCK = 0x5049_5045  # advisory lock id: concurrent instances migrate one at a time

_WANTED = {
    "user_id": "character varying(128)",
    "device_type": "character varying(32)",
    "masked_ip": "text",
    "masked_device_id": "text",
    "locale": "character varying(32)",
    "app_version": "character varying(32)",
    "create_date": "date",
    "message_id": "character varying(128)",
}


async def migrate(conn: asyncpg.Connection, table: str) -> list[str]:
    """Create or adapt ``table``; return the statements it ran (empty when up to date)."""
    ran: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        cols = _columns(await conn.fetch(
            "SELECT column_name, data_type, character_maximum_length FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1",
            table,
        ))
        if not cols:
            body = ", ".join(f"{name} {kind}" for name, kind in _WANTED.items())
            ran.append(f"CREATE TABLE {table} ({body})")
        else:
            for name, kind in _WANTED.items():
                have = cols.get(name)
                if have is None:
                    ran.append(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                elif have != kind and not _wide_enough(have, kind):
                    # USING ...::text keeps the takehome's integer app_version as its digits.
                    ran.append(f"ALTER TABLE {table} ALTER COLUMN {name} TYPE {kind} USING {name}::text")
        for stmt in ran:
            await conn.execute(stmt)
        await conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {table}_message_id_key ON {table} (message_id)")
    return ran


def _columns(records: list[asyncpg.Record]) -> dict[str, str]:
    out = {}
    for r in records:
        kind = r["data_type"]
        if r["character_maximum_length"] is not None:
            kind = f"{kind}({r['character_maximum_length']})"
        out[r["column_name"]] = kind
    return out


def _wide_enough(have: str, want: str) -> bool:
    """A text column, or a varchar at least as wide, can stay as it is."""
    if have == "text":
        return want.startswith(("character varying", "text"))
    if have.startswith("character varying(") and want.startswith("character varying("):
        return int(have[18:-1]) >= int(want[18:-1])
    return False
