"""The ``user_logins`` schema, and the migration that adapts the takehome's table in place.

The takehome pre-creates the table with ``app_version integer``, ``varchar(256)`` masked
columns and no message id. Migration keeps every existing row: it converts
``app_version`` to text (``2`` stays ``"2"``), widens the masked columns for AES-SIV
tokens, and adds ``message_id`` with a unique index for idempotent upserts (existing rows
keep a NULL id, which the unique index allows). Such a table stays unpartitioned (``migrate
--partition`` converts it online, see ``pipeline.table.convert``); a missing table is created
partitioned by month unless ``postgres.partitioned`` is off (``pipeline.table.partitions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from .table.partitions import COLUMNS_SQL, Layout, create_statements, plan_partitioned, relkind

__all__ = ["migrate", "plan", "inspect", "SchemaReport", "MIGRATION_LOCK", "Layout"]

MIGRATION_LOCK = 0x5049_5045  # advisory lock id: concurrent instances migrate one at a time

_WANTED = COLUMNS_SQL


async def migrate(conn: asyncpg.Connection, table: str, layout: Layout | None = None, *,
                  lock_timeout: float | None = None) -> list[str]:
    """Create or adapt ``table``; return the statements it ran (empty when up to date).

    It runs exactly what ``plan`` returns, read under the advisory lock, so ``check``
    (which reports ``plan``) and ``migrate`` cannot disagree about what is pending.
    ``lock_timeout`` (seconds): give up rather than queue every writer behind a lock
    that a long transaction holds (the periodic maintenance retries later).
    """
    layout = layout or Layout()
    async with conn.transaction():
        if lock_timeout:
            await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        ran = await plan(conn, table, layout)
        if ran and await relkind(conn, table) == "p":
            # A writer routing a row into DEFAULT while a month is carved out of it would make the
            # DDL fail: let in-flight batches finish, hold new ones for the moment, read again.
            await conn.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
            ran = await plan(conn, table, layout)
        for stmt in ran:
            await conn.execute(stmt)
    return ran


async def plan(conn: asyncpg.Connection, table: str, layout: Layout | None = None) -> list[str]:
    """The statements that bring ``table`` (in the current schema) up to date; changes nothing."""
    layout = layout or Layout()
    kind = await relkind(conn, table)
    if kind is None and layout.partitioned:
        return create_statements(table, layout)
    cols = await _read_columns(conn, table)
    out = _plan_columns(cols, table)
    if kind == "p":
        return out + await plan_partitioned(conn, table, layout)
    if not cols or not await conn.fetchval(_UNIQUE_MESSAGE_ID, table):
        # No IF NOT EXISTS: an unsuitable index of that name must fail here, not later at the upsert.
        out.append(f"CREATE UNIQUE INDEX {table}_message_id_key ON {table} (message_id)")
    return out


# A unique index on message_id alone, without a predicate: what ON CONFLICT (message_id) needs.
_UNIQUE_MESSAGE_ID = (
    "SELECT count(*) > 0 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
    "WHERE i.indrelid = to_regclass(format('%I.%I', current_schema(), $1::text)) AND i.indisunique "
    "AND i.indnkeyatts = 1 AND i.indpred IS NULL AND a.attname = 'message_id'"
)


async def _read_columns(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    return _columns(await conn.fetch(
        "SELECT column_name, data_type, character_maximum_length FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = $1",
        table,
    ))


def _plan_columns(cols: dict[str, str], table: str) -> list[str]:
    """The table statements for a table with columns ``cols`` (empty: absent); the index is ``plan``'s."""
    if not cols:
        body = ", ".join(f"{name} {kind}" for name, kind in _WANTED.items())
        return [f"CREATE TABLE {table} ({body})"]
    out = []
    for name, kind in _WANTED.items():
        have = cols.get(name)
        if have is None:
            out.append(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        elif have != kind and not _wide_enough(have, kind):
            # USING ...::text keeps the takehome's integer app_version as its digits.
            out.append(f"ALTER TABLE {table} ALTER COLUMN {name} TYPE {kind} USING {name}::text")
    return out


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


@dataclass
class SchemaReport:
    """What ``inspect`` found: read-only, nothing is changed."""

    table: str
    schema: str | None
    exists: bool
    columns: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # what ``migrate`` would run
    problems: list[str] = field(default_factory=list)  # what would make ``run``/``migrate`` fail

    @property
    def ok(self) -> bool:
        return self.exists and not self.problems


async def inspect(conn: asyncpg.Connection, table: str, layout: Layout | None = None) -> SchemaReport:
    """Is ``table`` present and compatible with what the pipeline writes? Changes nothing.

    Compatible means: the columns the pipeline writes exist (or ``migrate`` can add or
    convert them in place, with the privileges that takes), no other column demands a
    value, and the user may insert and create the temporary staging table.
    """
    schema = await conn.fetchval("SELECT current_schema()")
    if schema is None:
        return SchemaReport(table, None, False, problems=["no schema on the search_path exists"])
    cols = await _read_columns(conn, table)
    qualified = f'"{schema}"."{table}"'
    if not cols and await conn.fetchval("SELECT to_regclass($1)", qualified) is not None:
        # information_schema hides the columns of a table the user has no privilege on.
        return SchemaReport(table, schema, True, problems=["the user has no privileges on the table"])
    report = SchemaReport(table, schema, bool(cols), cols, await plan(conn, table, layout))
    problems = report.problems
    if not await conn.fetchval("SELECT has_database_privilege(current_database(), 'TEMP')"):
        problems.append("the user may not create temporary tables (GRANT TEMP ON DATABASE …), needed for COPY staging")
    if not cols:
        if not await conn.fetchval("SELECT has_schema_privilege(current_schema(), 'CREATE')"):
            problems.append(f"the user may not create tables in schema {schema}")
        return report
    for name, have in cols.items():
        want = _WANTED.get(name)
        if want == "date" and have != "date":
            problems.append(f"column {name} is {have}; it cannot be converted to date in place")
    required = await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 "
        "AND is_nullable = 'NO' AND column_default IS NULL AND is_identity = 'NO' AND is_generated = 'NEVER'",
        schema, table,
    )
    for r in required:
        if r["column_name"] not in _WANTED:
            problems.append(f"column {r['column_name']} is NOT NULL without a default; the pipeline does not write it")
    if not await conn.fetchval("SELECT has_table_privilege($1, 'INSERT')", qualified):
        problems.append("the user may not INSERT into the table")
    if report.pending and not await conn.fetchval(
        "SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = $1::regclass", qualified
    ):
        problems.append("the table needs migrating and the user does not own it")
    return report
