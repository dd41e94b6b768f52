"""``python -m pipeline retention --keep-days N``: remove rows dated before the cutoff.

Whole partitions older than the cutoff are detached and dropped: that costs a catalog change,
not a row-by-row delete, and leaves no bloat. What is left (a partition that straddles the
cutoff, the ``DEFAULT`` partition, an unpartitioned table) is deleted in batches, one
transaction each, so no transaction holds millions of row locks and an interruption loses
nothing but time: a rerun continues, and a run with nothing to do changes nothing. Rows
without a ``create_date`` (from before the pipeline) cannot be aged and are kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from typing import Any

import asyncpg
import orjson

from ..audit import write_audit
from ..errors import EXIT_CONFIG
from ..settings import Settings
from .partitions import list_partitions, relkind

__all__ = ["retention", "add_arguments", "command", "RETENTION_LOCK"]

log = logging.getLogger("pipeline.retention")

RETENTION_LOCK = 0x5049_5052  # one retention at a time (the command, or one instance's periodic run)


def cutoff_for(keep_days: int, today: dt.date | None = None) -> dt.date:
    """Rows dated before this are removed: ``keep_days`` days, today included, are kept."""
    return (today or dt.datetime.now(dt.UTC).date()) - dt.timedelta(days=keep_days - 1)


async def retention(conn: asyncpg.Connection, table: str, keep_days: int, *, today: dt.date | None = None,
                    dry_run: bool = False, batch_size: int = 10_000, lock_timeout: float | None = None) -> dict[str, Any]:
    """Apply retention to ``table``; return the report (what was, or with ``dry_run`` would be, removed)."""
    cutoff = cutoff_for(keep_days, today)
    kind = await relkind(conn, table)
    if kind is None:
        raise LookupError(f"table {table} does not exist")
    dropped: list[str] = []
    deleted: dict[str, int] = {}
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
        raise RuntimeError("another retention is running on this database; try again when it has finished")
    try:
        targets = [table]
        if kind == "p":
            targets = []
            for part in await list_partitions(conn, table):
                match part.rows_before(cutoff):
                    case "all":
                        dropped.append(part.name)
                        if not dry_run:
                            await _drop(conn, table, part.name, lock_timeout)
                    case "some":
                        targets.append(part.name)
        for name in targets:
            n = await (_count(conn, name, cutoff) if dry_run else _delete(conn, name, cutoff, batch_size))
            if n:
                deleted[name] = n
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
    return {"table": table, "keep_days": keep_days, "cutoff": cutoff.isoformat(), "dry_run": dry_run,
            "partitions_dropped": dropped, "rows_deleted": deleted, "rows_deleted_total": sum(deleted.values())}


async def _drop(conn: asyncpg.Connection, table: str, part: str, lock_timeout: float | None) -> None:
    async with conn.transaction():
        if lock_timeout:
            await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        await conn.execute(f"ALTER TABLE {table} DETACH PARTITION {part}")
        await conn.execute(f"DROP TABLE {part}")
    log.info("partition dropped", extra={"table": table, "partition": part})


async def _count(conn: asyncpg.Connection, name: str, cutoff: dt.date) -> int:
    return await conn.fetchval(f"SELECT count(*) FROM {name} WHERE create_date < $1", cutoff)


async def _delete(conn: asyncpg.Connection, name: str, cutoff: dt.date, batch_size: int) -> int:
    """Delete in batches of ``batch_size`` rows, each its own transaction (``name`` is a leaf table)."""
    total = 0
    while True:
        status = await conn.execute(
            f"DELETE FROM {name} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {name} WHERE create_date < $1 LIMIT $2))",
            cutoff, batch_size)
        n = int(status.rpartition(" ")[2])
        total += n
        if n < batch_size:
            return total
        log.info("retention progress", extra={"table": name, "rows_deleted": total})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Remove rows dated before today minus N days: drop whole partitions older than that, delete the "
                     "older rows of the rest in batches. Prints a JSON report and writes an audit record. Idempotent.")
    p.add_argument("--keep-days", type=int, metavar="N", help="days to keep, today included (default: postgres.retention_days)")
    p.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    p.add_argument("--batch-size", type=int, default=10_000, help="rows per delete transaction (default: %(default)s)")


async def command(settings: Settings, args: argparse.Namespace) -> int:
    from ..clients import connect_postgres
    from ..embedded import embedded
    from ..errors import MIGRATE_HINT, PreflightError

    keep = args.keep_days if args.keep_days is not None else settings.postgres.retention_days
    if keep is None or keep < 1 or args.batch_size < 1:
        print("error: give --keep-days N (N >= 1) or set postgres.retention_days; --batch-size must be >= 1",
              file=sys.stderr)
        return EXIT_CONFIG
    table = settings.postgres.table
    async with embedded(settings, broker=False, key=False) as effective:
        conn = await connect_postgres(effective)
        try:
            report = await retention(conn, table, keep, dry_run=args.dry_run, batch_size=args.batch_size)
        except LookupError:
            raise PreflightError(f"table {table} does not exist yet; {MIGRATE_HINT}") from None
        finally:
            await conn.close()
    write_audit(settings, "retention", refusal="the rows are removed but unaudited", **_audited(report))
    print(orjson.dumps(report).decode())
    return 0


def _audited(report: dict[str, Any]) -> dict[str, Any]:
    return {k: report[k] for k in ("table", "keep_days", "cutoff", "dry_run", "partitions_dropped", "rows_deleted_total")}
