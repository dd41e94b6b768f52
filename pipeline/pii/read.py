"""Running a parsed recovery query: catalog lookup, SQL rebuilt from the tree, a guarded read.

The tree from ``pipeline.pii.query`` names columns; here they are checked against the
table's catalog entry and quoted by us, every literal becomes a bound parameter cast from text
to its column's type, and the read runs in a read-only, time-boxed transaction, preferably as a
role that may only ``SELECT`` the table (``postgres.recovery_dsn``). Each layer would stop an
attack the others missed; none of them sends the operator's text to PostgreSQL.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import SecretStr

from stages.masking import Masker

from .query import Lit, Query, QueryRefused
from ..settings import Settings

__all__ = ["Catalog", "QueryError", "read_rows", "render"]

log = logging.getLogger("pipeline.pii.unmask")

QUERY_TIMEOUT_MS = 60_000  # a recovery reads a few rows; a runaway scan must not hold the table
# format_type() names of built-in types ("character varying", "timestamp with time zone", "text[]").
_TYPE_NAME = re.compile(r"[a-z][a-z0-9_ ]*(?:\[\])?")


class QueryError(RuntimeError):
    """``--query`` failed in PostgreSQL: shown to the operator; the audit gets ``reason`` (no values)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = f"query failed: {reason}"


@dataclass(frozen=True)
class Catalog:
    """The table as PostgreSQL's catalog describes it: the only names a query may use."""

    schema: str
    table: str
    columns: dict[str, str]  # name -> format_type(type, NULL), in column order


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def render(q: Query, catalog: Catalog) -> tuple[str, list[str | None]]:
    """The SQL to run and its parameters: our text around catalog names, the operator's values bound."""
    params: list[str | None] = []

    def col(name: str) -> str:
        if name not in catalog.columns:
            raise QueryRefused(f"{catalog.table} has no column {name} (it has {', '.join(catalog.columns)})")
        return quote_ident(name)

    def bind(lit: Lit, column: str | None) -> str:
        params.append(lit.value)
        if column is None:
            return f"${len(params)}::text"
        kind = catalog.columns[column]
        if not _TYPE_NAME.fullmatch(kind):
            raise QueryRefused(f"column {column} has type {kind}; only built-in types can be compared")
        return f"${len(params)}::text::{kind}"

    def cond(node: Any) -> str:
        tag = node[0]
        if tag in ("or", "and"):
            return "(" + f" {tag.upper()} ".join(cond(n) for n in node[1]) + ")"
        if tag == "not":
            return f"(NOT {cond(node[1])})"
        name, c = node[1], col(node[1])
        if tag == "cmp":
            return f"{c} {node[2]} {bind(node[3], name)}"
        if tag == "null":
            return f"{c} IS {'NOT ' if node[2] else ''}NULL"
        if tag == "like":
            return f"{c} {'NOT ' if node[3] else ''}{node[2]} {bind(node[4], None)}"
        if tag == "in":
            return f"{c} {'NOT ' if node[2] else ''}IN ({', '.join(bind(x, name) for x in node[3])})"
        if tag == "between":
            return f"{c} {'NOT ' if node[2] else ''}BETWEEN {bind(node[3], name)} AND {bind(node[4], name)}"
        raise AssertionError(tag)

    names = list(catalog.columns) if q.columns is None else q.columns
    sql = f"SELECT {', '.join(col(n) for n in names)} FROM {quote_ident(catalog.schema)}.{quote_ident(catalog.table)}"
    if q.where is not None:
        sql += f" WHERE {cond(q.where)}"
    if q.order:
        sql += " ORDER BY " + ", ".join(f"{col(n)} {'DESC' if d else 'ASC'}" for n, d in q.order)
    if q.limit is not None:
        params.append(str(q.limit))
        sql += f" LIMIT ${len(params)}::text::bigint"
    return sql, params


async def read_rows(settings: Settings, plan: Query) -> tuple[list[asyncpg.Record], Masker]:
    """Rows of ``plan``, read with ``postgres.recovery_dsn`` when set, in a read-only, time-boxed transaction."""
    from ..embedded import embedded
    from ..clients import connect_postgres, masker_for

    recovery_dsn = settings.postgres.recovery_dsn.get_secret_value()
    if recovery_dsn:  # the read-only recovery role, not the pipeline's writer
        settings = settings.model_copy(update={"postgres": settings.postgres.model_copy(
            update={"dsn": SecretStr(recovery_dsn)})})
    async with embedded(settings, broker=False) as effective:
        masker = await masker_for(effective)
        conn = await connect_postgres(effective)
        try:
            role, superuser = await conn.fetchrow(
                "SELECT current_user::text, current_setting('is_superuser') = 'on'")
            if superuser:
                log.warning("unmask reads as a PostgreSQL superuser; set postgres.recovery_dsn to a role that may "
                            "only SELECT the table (README, Recovery procedure)", extra={"role": role})
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                await conn.execute(f"SET LOCAL statement_timeout = {QUERY_TIMEOUT_MS}")
                catalog = await _catalog(conn, effective.postgres.table)
                sql, params = render(plan, catalog)
                return await conn.fetch(sql, *params), masker
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise QueryError(f"query failed: {type(exc).__name__}: {exc}", type(exc).__name__) from None
        finally:
            await conn.close()


async def _catalog(conn: asyncpg.Connection, table: str) -> Catalog:
    """The table's real columns and types: the only names a query may use."""
    row = await conn.fetchrow(
        "SELECT n.nspname::text AS schema, c.relname::text AS name, c.relkind::text AS kind,"
        " array_agg(a.attname::text ORDER BY a.attnum) AS names,"
        " array_agg(pg_catalog.format_type(a.atttypid, NULL) ORDER BY a.attnum) AS types"
        " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
        " WHERE c.oid = pg_catalog.to_regclass($1) GROUP BY 1, 2, 3",
        table,
    )
    if row is None:
        raise QueryError(f"table {table} does not exist (python -m pipeline migrate creates it)", "no such table")
    if row["kind"] not in ("r", "p"):
        raise QueryRefused(f"{table} is not a plain table")
    return Catalog(row["schema"], row["name"], dict(zip(row["names"], row["types"])))
