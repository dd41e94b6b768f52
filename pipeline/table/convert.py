"""``python -m pipeline migrate --partition``: turn an unpartitioned table into a partitioned one, online.

1. **Prepare** (one transaction): create ``<table>_partitioned`` (monthly partitions from the
   oldest row's month to the months ahead, ``DEFAULT``, the key and indexes, already named for
   ``<table>``), a progress row in ``<table>_partition_progress``, and statement-level triggers
   that mirror every insert, update and delete on the old table into the new one. The old
   table's size in blocks at that moment bounds what the copy must cover: a row written later
   reaches the new table through the triggers.
2. **Copy** in batches of heap blocks (a TID range scan), each batch one transaction that locks
   the rows it reads (``FOR SHARE``: a concurrent delete or update waits for the batch and its
   mirror then sees the copy) and advances the progress row. ``ON CONFLICT DO NOTHING`` absorbs
   rows the triggers brought first. Interrupted, a rerun continues from the progress row.
3. **Swap** (one transaction, under a short ``ACCESS EXCLUSIVE`` lock): drop the triggers, rename
   the old table away (dropped unless ``--keep-old``) and the new one to ``<table>``.

Writers keep going throughout: the sink's statement names the table, so after the swap it
resolves to the new one. Rows without a ``message_id`` (from before the pipeline) are copied as
they are; do not ``rekey`` while a conversion runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any, Callable

import asyncpg

from ..schema import migrate
from .partitions import COLUMNS_SQL, Layout, add_months, create_statements, month_start, relkind

__all__ = ["convert", "ConvertError", "CONVERT_LOCK"]

log = logging.getLogger("pipeline.convert")

CONVERT_LOCK = 0x5049_5043  # one conversion at a time


class ConvertError(RuntimeError):
    """The table cannot be converted as it is; one line for the operator."""


def _names(table: str) -> tuple[str, str, str]:
    return f"{table}_partitioned", f"{table}_partition_progress", f"{table}_partition_mirror"


async def convert(conn: asyncpg.Connection, table: str, layout: Layout, *, batch_blocks: int = 1000,
                  keep_old: bool = False, max_batches: int | None = None, lock_timeout: float = 5.0,
                  on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Convert ``table`` (prepare, copy, swap; resuming where a previous run stopped); return the summary."""
    new, progress, _ = _names(table)
    started = time.monotonic()
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", CONVERT_LOCK):
        raise ConvertError("another `migrate --partition` is running on this database")
    try:
        kind = await relkind(conn, table)
        if kind == "p":
            return {"table": table, "status": "already partitioned", "rows_copied": 0}
        if kind is None:
            raise ConvertError(f"table {table} does not exist; `migrate` creates it partitioned")
        if kind != "r":
            raise ConvertError(f"{table} is not a table (relkind {kind})")
        resumed = await relkind(conn, progress) is not None
        if not resumed:
            await migrate(conn, table, layout)  # columns first: the copy moves exactly the current ones
            await _prepare(conn, table, layout)
        row = await conn.fetchrow(f"SELECT next_block, end_block, copied FROM {progress}")
        batches = 0
        while row["next_block"] < row["end_block"]:
            if max_batches is not None and batches >= max_batches:
                return {"table": table, "status": "interrupted", "resumed": resumed, **_progress(row)}
            row = await _copy_batch(conn, table, row["next_block"], min(row["next_block"] + batch_blocks, row["end_block"]))
            batches += 1
            if on_progress:
                on_progress(_progress(row))
        await _swap(conn, table, keep_old, lock_timeout)
        rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
        return {"table": table, "status": "converted", "resumed": resumed, **_progress(row), "rows": rows,
                "old_table": f"{table}_unpartitioned" if keep_old else None,
                "seconds": round(time.monotonic() - started, 2)}
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", CONVERT_LOCK)


def _progress(row: asyncpg.Record) -> dict[str, Any]:
    return {"blocks_done": row["next_block"], "blocks_total": row["end_block"], "rows_copied": row["copied"]}


async def _prepare(conn: asyncpg.Connection, table: str, layout: Layout) -> None:
    new, progress, mirror = _names(table)
    extra = [r[0] for r in await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
        table) if r[0] not in COLUMNS_SQL]
    if extra:
        raise ConvertError(f"table {table} has columns the pipeline does not know ({', '.join(sorted(extra))}); "
                           "a conversion would lose them: drop them or convert by hand")
    oldest = await conn.fetchval(f"SELECT min(create_date) FROM {table}")
    first = month_start(min(oldest, layout.current_month())) if oldest else layout.current_month()
    months, m = [], first
    while m <= layout.months()[-1]:
        months.append(m)
        m = add_months(m, 1)
    cols = ", ".join(COLUMNS_SQL)
    row_of = lambda alias: "(" + ", ".join(f"{alias}.{c}" for c in COLUMNS_SQL) + ")"  # noqa: E731
    # Same key (or, without a message_id, same row). Each branch pins both key columns by equality
    # or IS NULL (IS NOT DISTINCT FROM is no index condition): an index lookup on
    # (create_date, message_id), so a mirrored delete never scans the new table's index whole.
    same_row = f"{row_of('n')} IS NOT DISTINCT FROM {row_of('o')}"
    key_match = " OR ".join(f"({d} AND {m})" for d in (
        "n.create_date = o.create_date", "n.create_date IS NULL AND o.create_date IS NULL") for m in (
        "n.message_id = o.message_id", f"n.message_id IS NULL AND o.message_id IS NULL AND {same_row}"))
    key_match = f"({key_match})"
    async with conn.transaction():
        for stmt in create_statements(new, layout, named_for=table, months=months):
            await conn.execute(stmt)
        await conn.execute(f"CREATE TABLE {progress} (next_block bigint NOT NULL, end_block bigint NOT NULL, "
                           "copied bigint NOT NULL, started_at timestamptz NOT NULL DEFAULT now())")
        await conn.execute(f"""
            CREATE FUNCTION {mirror}_ins() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
              INSERT INTO {new} ({cols}) SELECT {cols} FROM new_rows ON CONFLICT DO NOTHING; RETURN NULL; END $$;
            CREATE FUNCTION {mirror}_del() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
              DELETE FROM {new} n USING old_rows o WHERE {key_match}; RETURN NULL; END $$;
            CREATE FUNCTION {mirror}_upd() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
              DELETE FROM {new} n USING old_rows o WHERE {key_match};
              INSERT INTO {new} ({cols}) SELECT {cols} FROM new_rows WHERE message_id IS NOT NULL
                ON CONFLICT DO NOTHING; RETURN NULL; END $$;
            CREATE TRIGGER {mirror}_ins AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows
              FOR EACH STATEMENT EXECUTE FUNCTION {mirror}_ins();
            CREATE TRIGGER {mirror}_del AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows
              FOR EACH STATEMENT EXECUTE FUNCTION {mirror}_del();
            CREATE TRIGGER {mirror}_upd AFTER UPDATE ON {table} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
              FOR EACH STATEMENT EXECUTE FUNCTION {mirror}_upd();
        """)
        # CREATE TRIGGER holds a lock that keeps writers out until commit: every row already in the
        # table lies below this block, every later one is mirrored.
        end = await conn.fetchval(f"SELECT pg_relation_size('{table}') / current_setting('block_size')::bigint")
        await conn.execute(f"INSERT INTO {progress} (next_block, end_block, copied) VALUES (0, $1, 0)", end)
    log.info("conversion prepared", extra={"table": table, "blocks": end, "months": len(months)})


async def _copy_batch(conn: asyncpg.Connection, table: str, lo: int, hi: int) -> asyncpg.Record:
    new, progress, _ = _names(table)
    cols = ", ".join(COLUMNS_SQL)
    async with conn.transaction():
        status = await conn.execute(
            f"INSERT INTO {new} ({cols}) SELECT {cols} FROM {table} "
            f"WHERE ctid >= '({lo},0)'::tid AND ctid < '({hi},0)'::tid FOR SHARE ON CONFLICT DO NOTHING")
        n = int(status.rpartition(" ")[2])
        row = await conn.fetchrow(f"UPDATE {progress} SET next_block = $1, copied = copied + $2 "
                                  "RETURNING next_block, end_block, copied", hi, n)
    log.info("conversion progress", extra={"table": table, **_progress(row)})
    return row


async def _swap(conn: asyncpg.Connection, table: str, keep_old: bool, lock_timeout: float, attempts: int = 20) -> None:
    """Rename under ``ACCESS EXCLUSIVE``; a lock timeout (a long transaction in the way) is retried, never queued behind."""
    new, progress, mirror = _names(table)
    for attempt in range(1, attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
                await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                for op in ("ins", "del", "upd"):
                    await conn.execute(f"DROP TRIGGER {mirror}_{op} ON {table}; DROP FUNCTION {mirror}_{op}()")
                await conn.execute(f"ALTER TABLE {table} RENAME TO {table}_unpartitioned")
                await conn.execute(f"ALTER TABLE {new} RENAME TO {table}")
                await conn.execute(f"DROP TABLE {progress}")
                if not keep_old:
                    await conn.execute(f"DROP TABLE {table}_unpartitioned")
            log.info("conversion swapped", extra={"table": table, "attempt": attempt})
            return
        except asyncpg.LockNotAvailableError:
            log.warning("swap lock not available, retrying", extra={"table": table, "attempt": attempt})
            await asyncio.sleep(min(0.2 * attempt, 2.0))
    raise ConvertError(f"could not lock {table} for the swap in {attempts} attempts (a long transaction holds it); "
                       "rerun `migrate --partition` to retry: the copy is kept")


def today_utc() -> dt.date:
    return dt.datetime.now(dt.UTC).date()
