"""``python -m pipeline bench --table``: what the table's layout costs and saves, on PostgreSQL alone.

* **ingest**: COPY-with-upsert (the sink's own statements, ``stages.sink.upsert_sql``) of fresh
  rows dated today, in ``pipeline.batch_size`` batches, into a partitioned table (with the
  configured indexes, and without them: their cost) and into an unpartitioned one (unique
  ``message_id`` only), each empty and then holding ``--table-rows`` rows spread over the past
  year. The fill is generated server-side (``generate_series``) and indexed afterwards: fast;
  but the current month's share of it is inserted with the indexes in place, as the pipeline
  does. Every state, empty or full, is measured alike, in steady state: a ``CHECKPOINT``, one
  unmeasured warm-up round of the same inserts (it pays the full-page images in WAL of every
  page it touches first, which a server pays once per checkpoint cycle, not per 100,000 rows),
  then ``--rounds`` measured rounds into the same table (so the empty table's are its rows
  100,000 to 400,000); the median is reported, with the WAL written and full-page images per
  round, the warm-up round's figures (right after a checkpoint; for the empty table, its first
  rows) and the sizes of the indexes that take today's rows.
* **retention**: removing a month of ``--month-rows`` rows by dropping its partition
  (``retention``), and by batched ``DELETE`` from an unpartitioned table.

Tables are private (``bench_tbl_*``) and dropped after. No SQS is involved.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import random
import sys
import time
import uuid
from typing import Any

import asyncpg
import orjson

from stages.sink import STAGE_TABLE, create_stage_table, upsert_sql
from stages.transform import COLUMNS

from ...settings import Settings
from ...table.partitions import Layout, add_months, create_statements, month_start, partition_name
from ...table.retention import retention

__all__ = ["table_bench", "add_table_arguments", "table_command"]

log = logging.getLogger("pipeline.bench")

# Masked values look like tokens: random text (as AES-SIV output is), an ip per row, a device seen ~10 times.
_FILL = ("INSERT INTO {t} (user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date, message_id) "
         "SELECT 'user-' || (i % 100000), 'android', 'k.' || md5(i::text), 'k.' || md5((i % 1000003)::text), 'RU', "
         "'2.3.0', {start}::date + (i % {days}), md5(i::text) FROM generate_series({lo}, {hi}) i")
_DEVICES = 1_000_003  # as in _FILL
# Full-page images written to WAL (server-wide) and checkpoints begun: what a round paid for and why.
_COUNTERS = ("SELECT (SELECT wal_fpi FROM pg_stat_wal), "
             "(SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter), "
             "(SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0)::bigint FROM pg_stat_all_tables "
             "WHERE relname LIKE 'bench_tbl%')")


async def _create(conn: asyncpg.Connection, table: str, kind: str, indexes: tuple[str, ...], today: dt.date) -> None:
    await conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
    if kind == "unpartitioned":
        await conn.execute(create_statements(table, Layout(indexes=()), months=[])[0].replace(
            " PARTITION BY RANGE (create_date)", ""))
        return
    months = [add_months(month_start(today), i) for i in range(-13, 3)]
    for stmt in create_statements(table, Layout(indexes=indexes, today=today), months=months):
        if "INDEX" not in stmt:  # indexes after the fill: building is faster than maintaining
            await conn.execute(stmt)


async def _index(conn: asyncpg.Connection, table: str, kind: str, indexes: tuple[str, ...], today: dt.date) -> None:
    if kind == "unpartitioned":
        await conn.execute(f"CREATE UNIQUE INDEX {table}_message_id_key ON {table} (message_id)")
        return
    for stmt in create_statements(table, Layout(indexes=indexes, today=today), months=[]):
        if "INDEX" in stmt:
            await conn.execute(stmt)


async def _fill(conn: asyncpg.Connection, table: str, rows: int, today: dt.date, *, through_today: bool = False,
                current: bool = False, chunk: int = 1_000_000) -> None:
    """``rows`` over the 12 months before this one (history), or over the last 365 days up to today.

    With ``through_today``, only the rows before this month, or (``current``) only this month's:
    those are inserted after the indexes exist, as the pipeline inserts them. An index built over
    them afterwards would be packed full, and the measured inserts would split nearly every page
    of it, which a partition grown by inserts never sees.
    """
    start = today - dt.timedelta(days=365) if through_today else add_months(month_start(today), -12)
    days = 365 if through_today else (month_start(today) - start).days
    fill = _FILL
    if through_today:
        fill += f" WHERE ('{start}'::date + (i % {days})) {'>=' if current else '<'} '{month_start(today)}'"
    for lo in range(1, rows + 1, chunk):
        await conn.execute(fill.format(t=table, start=f"'{start}'", days=days, lo=lo, hi=min(lo + chunk - 1, rows)))
    await conn.execute(f"VACUUM ANALYZE {table}")


def _token(text: str) -> str:
    return "k." + hashlib.md5(text.encode()).hexdigest()


async def _ingest(conn: asyncpg.Connection, table: str, batches: int, batch_size: int, today: dt.date,
                  *, checkpoint: bool = False) -> dict[str, Any]:
    """One round; with ``checkpoint``, from a checkpoint (it never pays for writing out the fill).

    Fresh rows carry random tokens like real ones (a new ip, a device drawn from the fill's): a
    sequential fake token would always land at the same end of its index and hide that cost.
    """
    await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{STAGE_TABLE}")
    await create_stage_table(conn, table)
    insert = upsert_sql(table)
    if checkpoint:
        try:
            await conn.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:  # neither superuser nor pg_checkpoint: measured as it comes
            pass
    wal0 = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    fpi0, ckpt0, av0 = await conn.fetchrow(_COUNTERS)
    seconds, rows = 0.0, 0
    for _ in range(batches):
        records = [(str(uuid.uuid4()), "user-1", "ios", _token(uuid.uuid4().hex), _token(str(random.randrange(_DEVICES))),
                    None, "2.3.0", today) for _ in range(batch_size)]
        t0 = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table(STAGE_TABLE, records=records, columns=COLUMNS, schema_name="pg_temp")
            await conn.execute(insert)
        seconds += time.perf_counter() - t0
        rows += batch_size
    wal = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)", wal0)
    fpi, ckpt, av = await conn.fetchrow(_COUNTERS)
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds) if seconds else None,
            "full_page_images": fpi - fpi0, "checkpoints": ckpt - ckpt0, "autovacuums": av - av0,
            "wal_bytes_per_row": round(float(wal) / rows) if rows else None}


async def _rounds(conn: asyncpg.Connection, table: str, rounds: int, batches: int, batch_size: int,
                  today: dt.date) -> dict[str, Any]:
    """A checkpoint, a warm-up round, ``rounds`` measured ones; the median reported with every round's rate.

    Every state alike, empty or full: the warm-up pays the first touch of each page since the
    checkpoint (a full-page image in WAL, a read), as a server does once per checkpoint cycle.
    Nothing is emptied between rounds: a table's first 100,000 rows go faster than any later
    ones (its indexes still fit in the CPU's caches), and measuring only those, as resetting
    the empty table did, compares every other state with a rate no table keeps.
    """
    warm = await _ingest(conn, table, batches, batch_size, today, checkpoint=True)
    runs = []
    for _ in range(rounds):
        runs.append(await _ingest(conn, table, batches, batch_size, today))
    median = sorted(runs, key=lambda x: x["rows_per_s"] or 0)[len(runs) // 2]
    return {**median, "rounds_rows_per_s": [x["rows_per_s"] for x in runs],
            "rounds_full_page_images": [x["full_page_images"] for x in runs],
            "rounds_checkpoints": [x["checkpoints"] for x in runs],
            "rounds_autovacuums": [x["autovacuums"] for x in runs],
            "after_checkpoint": {k: warm[k] for k in ("rows_per_s", "wal_bytes_per_row", "full_page_images")}}


async def _index_sizes(conn: asyncpg.Connection, table: str, today: dt.date, kind: str) -> dict[str, int]:
    """MB of each index of the partition that takes today's rows (or of the plain table)."""
    target = table if kind == "unpartitioned" else partition_name(table, month_start(today))
    rows = await conn.fetch("SELECT c.relname, pg_relation_size(c.oid) AS size FROM pg_index i "
                            "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1::text::regclass", target)
    return {r["relname"].removeprefix(target + "_"): round(r["size"] / 2**20) for r in rows}


async def table_bench(dsn: str, *, table_rows: int = 10_000_000, month_rows: int = 1_000_000, batches: int = 50,
                      batch_size: int = 2000, indexes: tuple[str, ...] = ("masked_ip", "masked_device_id"),
                      today: dt.date | None = None, rounds: int = 3) -> dict[str, Any]:
    """Run every measurement; return ``{"ingest": {...}, "retention": {...}, "ratios": {...}}``."""
    today = today or dt.datetime.now(dt.UTC).date()
    conn = await asyncpg.connect(dsn, command_timeout=None)
    out: dict[str, Any] = {"table_rows": table_rows, "month_rows": month_rows, "batch_size": batch_size,
                           "indexes": list(indexes), "rounds": rounds,
                           "shared_buffers": await conn.fetchval("SHOW shared_buffers"), "ingest": {}, "retention": {}}
    try:
        # (name, indexes, fills, rows up to today): the current month also holding a month's share of the
        # rows is what a partitioned table sees at the end of a month, history alone at its start. Without
        # indexes at a month's end: what the unique key alone costs there.
        variants = [("partitioned", indexes, [0, table_rows], False), ("partitioned_month_full", indexes, [table_rows], True),
                    ("partitioned_month_full_no_indexes", (), [table_rows], True),
                    ("partitioned_no_indexes", (), [0], False), ("unpartitioned", (), [0, table_rows], False)]
        for name, idx, fills, through_today in variants:
            kind = "unpartitioned" if name == "unpartitioned" else "partitioned"
            table = f"bench_tbl_{kind[0]}"
            for fill in fills:
                await _create(conn, table, kind, idx, today)
                if fill:
                    t0 = time.perf_counter()
                    await _fill(conn, table, fill, today, through_today=through_today)
                await _index(conn, table, kind, idx, today)
                if fill and through_today:
                    await _fill(conn, table, fill, today, through_today=True, current=True)
                if fill:
                    log.info("bench table filled", extra={"table": name, "rows": fill,
                                                          "seconds": round(time.perf_counter() - t0, 1)})
                r = await _rounds(conn, table, rounds, batches, batch_size, today)
                r["index_mb"] = await _index_sizes(conn, table, today, kind)
                out["ingest"][f"{name}@{fill}"] = r
                log.info("bench ingest", extra={"table": name, "rows_before": fill, **r})
            await conn.execute(f"DROP TABLE {table} CASCADE")
        out["retention"] = await _retention(conn, month_rows, today)
    finally:
        for t in ("bench_tbl_p", "bench_tbl_u"):
            await conn.execute(f"DROP TABLE IF EXISTS {t} CASCADE")
        await conn.close()
    ing = out["ingest"]

    def ratio(a: str, b: str) -> float | None:
        x, y = ing.get(a, {}).get("rows_per_s"), ing.get(b, {}).get("rows_per_s")
        return round(x / y, 2) if x and y else None

    def cold(a: str, b: str) -> float | None:
        x, y = (ing.get(k, {}).get("after_checkpoint", {}).get("rows_per_s") for k in (a, b))
        return round(x / y, 2) if x and y else None

    out["ratios"] = {
        "partitioned_full_vs_empty": ratio(f"partitioned@{table_rows}", "partitioned@0"),
        "partitioned_month_full_vs_empty": ratio(f"partitioned_month_full@{table_rows}", "partitioned@0"),
        "partitioned_month_full_vs_empty_after_checkpoint": cold(f"partitioned_month_full@{table_rows}", "partitioned@0"),
        "partitioned_month_full_no_indexes_vs_empty": ratio(f"partitioned_month_full_no_indexes@{table_rows}",
                                                            "partitioned_no_indexes@0"),
        "unpartitioned_full_vs_empty": ratio(f"unpartitioned@{table_rows}", "unpartitioned@0"),
        "partitioned_vs_unpartitioned_full": ratio(f"partitioned@{table_rows}", f"unpartitioned@{table_rows}"),
        "indexes_cost_empty": ratio("partitioned@0", "partitioned_no_indexes@0"),
    }
    r = out["retention"]
    out["met"] = {"ingest_full_ge_0.9_empty": (out["ratios"]["partitioned_full_vs_empty"] or 0) >= 0.9,
                  "ingest_month_end_ge_0.9_empty": (out["ratios"]["partitioned_month_full_vs_empty"] or 0) >= 0.9,
                  "drop_month_under_1s": r["drop_partition_s"] < 1.0}
    return out


async def _retention(conn: asyncpg.Connection, month_rows: int, today: dt.date) -> dict[str, Any]:
    """A month of ``month_rows`` rows a year back, removed by dropping its partition and by DELETE."""
    old = add_months(month_start(today), -12)
    keep = (today - old).days - 31  # the cutoff falls after that month, before the next ones
    result: dict[str, Any] = {}
    for kind in ("partitioned", "unpartitioned"):
        table = f"bench_tbl_{kind[0]}"
        await _create(conn, table, kind, (), today)
        await conn.execute(_FILL.format(t=table, start=f"'{old}'", days=28, lo=1, hi=month_rows))
        await conn.execute(_FILL.format(t=table, start=f"'{add_months(old, 2)}'", days=28, lo=month_rows + 1,
                                        hi=month_rows + month_rows // 10))
        await _index(conn, table, kind, (), today)
        await conn.execute(f"VACUUM ANALYZE {table}")
        t0 = time.perf_counter()
        report = await retention(conn, table, keep, today=today)
        seconds = round(time.perf_counter() - t0, 3)
        if kind == "partitioned":
            result.update(drop_partition_s=seconds, partitions_dropped=report["partitions_dropped"])
        else:
            result.update(delete_s=seconds, rows_deleted=report["rows_deleted_total"])
        await conn.execute(f"DROP TABLE {table} CASCADE")
    return result


def add_table_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", action="store_true",
                   help="instead: the table's layout on PostgreSQL alone: COPY-with-upsert into partitioned and "
                        "unpartitioned tables, empty and full, and retention of a month by DROP vs DELETE "
                        "(writes table.json)")
    p.add_argument("--table-rows", type=int, default=10_000_000,
                   help="with --table: rows in the full table (default: %(default)s)")
    p.add_argument("--month-rows", type=int, default=1_000_000,
                   help="with --table: rows of the month that retention removes (default: %(default)s)")
    p.add_argument("--table-batches", type=int, default=50,
                   help="with --table: COPY batches measured per variant (default: %(default)s)")


async def table_command(settings: Settings, args: argparse.Namespace) -> int:
    """``bench --table``: one line per measurement on stdout, then one JSON line (ratios, targets met, file)."""
    from ...embedded import embedded

    if min(args.table_rows, args.month_rows, args.table_batches) < 1:
        print("error: --table-rows, --month-rows and --table-batches must be >= 1", file=sys.stderr)
        return 2
    async with embedded(settings, broker=False, key=False) as effective:
        result = await table_bench(effective.postgres.dsn.get_secret_value(), table_rows=args.table_rows,
                                   month_rows=args.month_rows, batches=args.table_batches,
                                   batch_size=effective.pipeline.batch_size, indexes=effective.postgres.index_columns,
                                   rounds=max(1, args.rounds))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "table.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    for name, r in result["ingest"].items():
        cold = r["after_checkpoint"]
        print(f"ingest {name:<44} {r['rows_per_s']:>10,} rows/s (rounds {r['rounds_rows_per_s']}), "
              f"{r['wal_bytes_per_row']} WAL bytes/row (full-page images {r['rounds_full_page_images']}, "
              f"checkpoints {r['rounds_checkpoints']}, autovacuum/analyze {r['rounds_autovacuums']}), index MB {r['index_mb']}; right after a checkpoint "
              f"{cold['rows_per_s']:,} rows/s, {cold['wal_bytes_per_row']} WAL bytes/row, "
              f"{cold['full_page_images']} full-page images")
    ret = result["retention"]
    print(f"retention of {args.month_rows:,} rows: drop partition {ret['drop_partition_s']} s, DELETE {ret['delete_s']} s")
    sys.stdout.write(orjson.dumps({"ratios": result["ratios"], "met": result["met"], "files": {"json": str(path)}}).decode() + "\n")
    return 0
