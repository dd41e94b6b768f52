"""Monthly range partitions on ``create_date``: what exists, what is missing, the DDL that adds it.

A partitioned table is keyed on ``(create_date, message_id)``: PostgreSQL needs the partition key
in every unique index, and the pair still deduplicates every redelivery because ``create_date`` is
the message's send date, which never changes. ``create_date`` leads so that a day's inserts land in
one narrow region of the key instead of all over it: the current month's key stays cheap to
maintain once it outgrows shared buffers (tables from before keep ``(message_id, create_date)``;
either counts as the key). The masked columns get hash indexes: their values are pseudorandom
tokens, only equality on them means anything, and a hash index is about half a btree's size on
them. Rows dated outside the created months land in the
``DEFAULT`` partition; when a month is created later, its rows are moved out of ``DEFAULT`` in the
same transaction (PostgreSQL refuses to create a partition whose rows sit in ``DEFAULT``).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import asyncpg

__all__ = ["Layout", "Partition", "month_start", "add_months", "partition_name", "default_name", "relkind",
           "list_partitions", "create_statements", "plan_partitioned", "COLUMNS_SQL"]

# The table's columns in order: the conversion copies exactly these, by name.
COLUMNS_SQL = {
    "user_id": "character varying(128)",
    "device_type": "character varying(32)",
    "masked_ip": "text",
    "masked_device_id": "text",
    "locale": "character varying(32)",
    "app_version": "character varying(32)",
    "create_date": "date",
    "message_id": "character varying(128)",
}


@dataclass(frozen=True)
class Layout:
    """How a table should look: partitioned or not (for a new one), months ahead, indexed columns."""

    partitioned: bool = True
    ahead: int = 2
    indexes: tuple[str, ...] = ("masked_ip", "masked_device_id")
    today: dt.date | None = None  # tests pin the calendar; otherwise the UTC date, like create_date

    @classmethod
    def of(cls, settings: object, today: dt.date | None = None) -> Layout:
        pg = settings.postgres  # type: ignore[attr-defined]
        return cls(pg.partitioned, pg.partitions_ahead, pg.index_columns, today)

    def current_month(self) -> dt.date:
        return month_start(self.today or dt.datetime.now(dt.UTC).date())

    def months(self) -> list[dt.date]:
        """The current month and the ones ahead: what must exist."""
        first = self.current_month()
        return [add_months(first, i) for i in range(self.ahead + 1)]


@dataclass(frozen=True)
class Partition:
    name: str
    lower: dt.date | None  # None: the DEFAULT partition (or an unbounded side)
    upper: dt.date | None
    default: bool = False

    def rows_before(self, cutoff: dt.date) -> str:
        """``all``, ``some`` or ``none`` of its rows are dated before ``cutoff`` (by its bounds)."""
        if self.default or self.lower is None:
            return "some"
        if self.upper is not None and self.upper <= cutoff:
            return "all"
        return "some" if self.lower < cutoff else "none"


def month_start(d: dt.date) -> dt.date:
    return d.replace(day=1)


def add_months(d: dt.date, n: int) -> dt.date:
    y, m = divmod(d.year * 12 + d.month - 1 + n, 12)
    return dt.date(y, m + 1, 1)


def partition_name(table: str, month: dt.date) -> str:
    return f"{table}_{month:%Y_%m}"


def default_name(table: str) -> str:
    return f"{table}_default"


async def relkind(conn: asyncpg.Connection, table: str) -> str | None:
    """``p`` (partitioned), ``r`` (a plain table), or None (absent) in the current schema."""
    return await conn.fetchval(
        "SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass(format('%I.%I', current_schema(), $1::text))",
        table)


_BOUND = re.compile(r"FOR VALUES FROM \((.+?)\) TO \((.+?)\)")


def _bound(text: str) -> dt.date | None:
    text = text.strip().strip("'")
    return None if text in ("MINVALUE", "MAXVALUE") else dt.date.fromisoformat(text)


async def list_partitions(conn: asyncpg.Connection, table: str) -> list[Partition]:
    """The partitions of ``table``, oldest first, ``DEFAULT`` last."""
    rows = await conn.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass(format('%I.%I', current_schema(), $1::text))", table)
    out = []
    for r in rows:
        if r["bound"] == "DEFAULT":
            out.append(Partition(r["relname"], None, None, default=True))
            continue
        m = _BOUND.fullmatch(r["bound"])
        if m is None:  # not ours (list/hash bounds): leave it alone
            continue
        out.append(Partition(r["relname"], _bound(m.group(1)), _bound(m.group(2))))
    return sorted(out, key=lambda p: (p.default, p.lower or dt.date.min))


def _lit(d: dt.date) -> str:
    return f"'{d.isoformat()}'"


def create_statements(table: str, layout: Layout, *, named_for: str | None = None,
                      months: list[dt.date] | None = None) -> list[str]:
    """A new partitioned table: parent, unique key, indexes, ``DEFAULT``, the months.

    ``named_for``: the name the table will carry once it is swapped in (``migrate --partition``
    builds it under another name), so its indexes and partitions already have their final names.
    """
    final = named_for or table
    body = ", ".join(f"{name} {kind}" for name, kind in COLUMNS_SQL.items())
    out = [f"CREATE TABLE {table} ({body}) PARTITION BY RANGE (create_date)", _key(final, table)]
    out += [_index(final, table, col) for col in layout.indexes]
    out.append(f"CREATE TABLE {default_name(final)} PARTITION OF {table} DEFAULT")
    for month in months if months is not None else layout.months():
        out.append(f"CREATE TABLE {partition_name(final, month)} PARTITION OF {table} "
                   f"FOR VALUES FROM ({_lit(month)}) TO ({_lit(add_months(month, 1))})")
    return out


def _key(name: str, table: str) -> str:
    return f"CREATE UNIQUE INDEX {name}_create_date_message_id_key ON {table} (create_date, message_id)"


# Masked values are pseudorandom tokens: equality is the only meaningful lookup, which a hash index
# serves at about half a btree's size. Other columns may be ranged or sorted on: btree.
HASHED = ("masked_ip", "masked_device_id")


def _index(name: str, table: str, col: str) -> str:
    using = " USING hash" if col in HASHED else ""
    return f"CREATE INDEX {name}_{col}_idx ON {table}{using} ({col})"


# Unique index on exactly {message_id, create_date}, in either order, without a predicate: the partitioned table's key.
_UNIQUE_KEY = (
    "SELECT count(*) > 0 FROM pg_index i WHERE i.indrelid = to_regclass(format('%I.%I', current_schema(), $1::text)) "
    "AND i.indisunique AND i.indpred IS NULL AND i.indnkeyatts = 2 AND (SELECT array_agg(a.attname::text ORDER BY a.attname) "
    "FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) = ARRAY['create_date', 'message_id']"
)
# Columns that lead some index of the table: an index "on masked_ip" is there whatever its name and kind.
_LEADING = (
    "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
    "WHERE i.indrelid = to_regclass(format('%I.%I', current_schema(), $1::text))"
)


async def plan_partitioned(conn: asyncpg.Connection, table: str, layout: Layout) -> list[str]:
    """What an existing partitioned ``table`` lacks: its key, its indexes, ``DEFAULT``, the months ahead."""
    out = []
    if not await conn.fetchval(_UNIQUE_KEY, table):
        out.append(_key(table, table))
    leading = {r[0] for r in await conn.fetch(_LEADING, table)}  # btree or hash: either serves the lookups
    out += [_index(table, table, col) for col in layout.indexes if col not in leading]
    parts = await list_partitions(conn, table)
    default = next((p for p in parts if p.default), None)
    if default is None:
        out.append(f"CREATE TABLE {default_name(table)} PARTITION OF {table} DEFAULT")
    ranges = [(p.lower or dt.date.min, p.upper or dt.date.max) for p in parts if not p.default]
    for month in layout.months():
        end = add_months(month, 1)
        if any(lo < end and month < hi for lo, hi in ranges):
            continue  # covered (or overlapped by a range someone else made): nothing to add
        out += await _add_month(conn, table, default, month, end)
    return out


async def _add_month(conn: asyncpg.Connection, table: str, default: Partition | None, month: dt.date,
                     end: dt.date) -> list[str]:
    name, bounds = partition_name(table, month), f"FOR VALUES FROM ({_lit(month)}) TO ({_lit(end)})"
    if default is None or not await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {default.name} WHERE create_date >= $1 AND create_date < $2)", month, end):
        return [f"CREATE TABLE {name} PARTITION OF {table} {bounds}"]
    # Rows of that month wait in DEFAULT: move them into the new table, then attach it (one transaction).
    cols = ", ".join(COLUMNS_SQL)
    return [
        f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
        f"WITH moved AS (DELETE FROM {default.name} WHERE create_date >= {_lit(month)} AND create_date < {_lit(end)} "
        f"RETURNING {cols}) INSERT INTO {name} ({cols}) SELECT {cols} FROM moved",
        f"ALTER TABLE {table} ATTACH PARTITION {name} {bounds}",
    ]
