"""``python -m pipeline rekey``: re-mask existing rows from older keys to the active key.

After a rotation, rows written under the old key carry its id (``k1.…``) while new rows
carry the new one, so the same ip masks differently on either side and analysts' joins and
duplicate counts break. ``rekey`` decrypts each old token with its key from the ring and
encrypts it under the active key, which gives exactly the token a fresh write would get.

Batches of ``batch_size`` rows, one transaction each: ``SELECT … FOR UPDATE`` the next rows
whose masked columns carry another key id (keyset on the table's unique key, so each page is
an index range, not a sort: ``(create_date, message_id)`` on a partitioned table keyed that
way, ``message_id`` on others), re-mask them in Python, ``UPDATE … FROM unnest(…)`` matching
the whole key (on a partitioned table, also the batch's date range, so it prunes to the
partitions the batch came from). The WHERE skips rows already
on the active key, so the command is idempotent and resumable: after a crash, Ctrl-C or
``--max-batches`` a rerun continues where the last committed batch ended. Rows that
predate the pipeline (values that are not tokens, e.g. the takehome's hashes) are left
alone and reported as skipped. Before changing anything it refuses if any value carries a
key id the ring does not hold.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import asyncpg
import orjson

from stages.masking import KeyError_, Masker

from ..console import interactive
from .unmask import TOKEN_SQL, looks_like_token
from ..settings import Settings

__all__ = ["rekey", "rekey_command", "RekeyError", "REKEY_LOCK"]

log = logging.getLogger("pipeline.rekey")

REKEY_LOCK = 0x5049_5046  # advisory lock: one rekey per database at a time
COLUMNS = ("masked_ip", "masked_device_id")


class RekeyError(KeyError_):
    """Rekey cannot proceed; one line for the operator, never a value."""


def _needs(col: str) -> str:
    return f"({col} ~ $1 AND NOT starts_with({col}, $2))"


_NEEDS = " OR ".join(_needs(c) for c in COLUMNS)

# A unique index on exactly (create_date, message_id), in that order, without a predicate.
_DATE_KEY = (
    "SELECT count(*) > 0 FROM pg_index i WHERE i.indrelid = to_regclass($1) AND i.indisunique "
    "AND i.indpred IS NULL AND i.indnkeyatts = 2 "
    "AND (SELECT attname FROM pg_attribute WHERE attrelid = i.indrelid AND attnum = i.indkey[0]) = 'create_date' "
    "AND (SELECT attname FROM pg_attribute WHERE attrelid = i.indrelid AND attnum = i.indkey[1]) = 'message_id'"
)


class _Progress:
    """A rich progress bar on a TTY, plus a JSON log line every ``interval`` seconds."""

    def __init__(self, total: int, interval: float) -> None:
        self.total, self.done, self.interval = total, 0, interval
        self.start = self.last = time.monotonic()
        self.bar: Any = None
        if interactive() and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("rekey"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True, soft_wrap=True), transient=True, redirect_stderr=True)
            original = sys.stderr
            self.handlers = [h for h in logging.getLogger().handlers
                             if isinstance(h, logging.StreamHandler) and h.stream is original]
            self.bar.start()
            for h in self.handlers:
                h.setStream(sys.stderr)  # rich's proxy: log lines print above the bar, not through it
            self.original = original
            self.task = self.bar.add_task("rekey", total=total)

    def advance(self, rows: int, batches: int) -> None:
        self.done += rows
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            log.info("rekey progress", extra={"rows_updated": self.done, "rows_pending_at_start": self.total,
                                              "batches": batches,
                                              "rate_per_s": round(self.done / max(now - self.start, 1e-9), 1)})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            for h in self.handlers:
                h.setStream(self.original)


async def _plan(conn: asyncpg.Connection, table: str, prefix: str) -> dict[str, Any]:
    counts = await conn.fetchrow(
        f"SELECT count(*) FILTER (WHERE {_NEEDS}) AS pending, "
        f"count(*) FILTER (WHERE (masked_ip IS NOT NULL AND masked_ip !~ $1) "
        f"OR (masked_device_id IS NOT NULL AND masked_device_id !~ $1)) AS skipped, "
        f"count(*) AS total FROM {table}",
        TOKEN_SQL, prefix,
    )
    by_key = await conn.fetch(
        "SELECT kid, col, count(*) AS n FROM ("
        + " UNION ALL ".join(
            f"SELECT split_part({c}, '.', 1) AS kid, '{c}' AS col FROM {table} WHERE {_needs(c)}" for c in COLUMNS
        )
        + ") s GROUP BY kid, col ORDER BY kid, col",
        TOKEN_SQL, prefix,
    )
    old: dict[str, dict[str, int]] = defaultdict(dict)
    for r in by_key:
        old[r["kid"]][r["col"]] = r["n"]
    return {"pending": counts["pending"], "skipped": counts["skipped"], "total": counts["total"], "old": dict(old)}


async def rekey(
    conn: asyncpg.Connection, table: str, masker: Masker, *, batch_size: int = 1000,
    max_batches: int | None = None, dry_run: bool = False, progress_interval: float = 10,
) -> dict[str, Any]:
    """Re-mask every row not on ``masker.active``; return the report (see the module doc)."""
    started = time.monotonic()
    active = masker.active
    prefix = active + "."
    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
        raise RekeyError(f"table {table} does not exist (run `python -m pipeline migrate` or `run` first)")
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", REKEY_LOCK):
        raise RekeyError("another rekey is running on this database; wait for it (or stop it) and rerun")
    try:
        plan = await _plan(conn, table, prefix)
        missing = sorted(set(plan["old"]) - set(masker.key_ids))
        if missing:
            n = sum(plan["old"][missing[0]].values())
            raise RekeyError(
                f"{n} values carry key id {missing[0]!r}, which is not in the key ring ({', '.join(masker.key_ids)}); "
                "add that key to masking.keys or masking.key_file and rerun. Nothing was changed"
            )
        report: dict[str, Any] = {
            "table": table, "active_key_id": active, "key_ids": masker.key_ids, "dry_run": dry_run,
            "rows_pending_at_start": plan["pending"], "values_by_key_id_at_start": plan["old"],
            "rows_skipped_not_tokens": plan["skipped"], "rows_total": plan["total"],
        }
        log.info("rekey plan", extra={k: v for k, v in report.items() if k != "key_ids"})
        if dry_run:
            return report | {"rows_updated": 0, "batches": 0, "complete": plan["pending"] == 0,
                             "elapsed_s": round(time.monotonic() - started, 3)}
        changed: dict[str, Counter[str]] = defaultdict(Counter)
        updated = batches = 0
        stopped_early = False
        by_date = await conn.fetchval(_DATE_KEY, table)
        bar = _Progress(plan["pending"], progress_interval)
        try:
            for phase in ("date", "message_id", "ctid") if by_date else ("message_id", "ctid"):
                last: Any = None
                while True:
                    if max_batches is not None and batches >= max_batches:
                        stopped_early = True
                        break
                    n, last, counts = await _batch(conn, table, masker, prefix, phase, last, batch_size, by_date)
                    if not n:
                        break
                    batches += 1
                    updated += n
                    for kid, c in counts.items():
                        changed[kid].update(c)
                    bar.advance(n, batches)
                if stopped_early:
                    break
        finally:
            bar.close()
        remaining = (await _plan(conn, table, prefix))["pending"] if stopped_early else 0
        report |= {
            "rows_updated": updated,
            "values_rekeyed": {k: dict(v) for k, v in sorted(changed.items())},
            "batches": batches,
            "complete": remaining == 0,
            "rows_remaining": remaining,
            "elapsed_s": round(time.monotonic() - started, 3),
        }
        log.info("rekey finished", extra={k: v for k, v in report.items() if k != "key_ids"})
        return report
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", REKEY_LOCK)


def page_by_date_sql(table: str, *, first: bool) -> str:
    """The next page in key order: an index range on ``(create_date, message_id)``, no sort.

    ``$1``/``$2`` token pattern and active prefix, ``$3`` page size, ``$4``/``$5`` the last key
    of the previous page. A row comparison lets a NULL ``message_id`` through: excluded by name.
    """
    after = "" if first else "(create_date, message_id) > ($4::date, $5::text) AND "
    return (f"SELECT create_date AS day, message_id AS id, masked_ip, masked_device_id FROM {table} WHERE {after}"
            f"message_id IS NOT NULL AND create_date IS NOT NULL AND ({_NEEDS}) "
            "ORDER BY create_date, message_id LIMIT $3 FOR UPDATE")


def update_by_date_sql(table: str) -> str:
    """Match the whole key; ``$5``/``$6``, the page's first and last date, prune the other partitions."""
    return (f"UPDATE {table} AS t SET masked_ip = v.ip, masked_device_id = v.dev "
            "FROM unnest($1::text[], $2::date[], $3::text[], $4::text[]) AS v(id, day, ip, dev) "
            "WHERE t.create_date = v.day AND t.message_id = v.id AND t.create_date BETWEEN $5 AND $6")


async def _batch(
    conn: asyncpg.Connection, table: str, masker: Masker, prefix: str, phase: str, last: Any, size: int,
    by_date: bool,
) -> tuple[int, Any, dict[str, Counter[str]]]:
    """One transaction: lock the next ``size`` rows that need it, re-mask, update.

    Phases: ``date`` (keyset on ``(create_date, message_id)``, tables keyed that way), then
    ``message_id`` (keyset on it; on a date-keyed table only the rows without a ``create_date``,
    still an index range of its key), then ``ctid`` for the rows without a ``message_id``, which
    the WHERE alone makes progress through.
    """
    undated = " AND create_date IS NULL" if by_date else ""
    counts: dict[str, Counter[str]] = defaultdict(Counter)

    def remask(value: str | None, col: str, where: str) -> str | None:
        if value is None or not looks_like_token(value) or value.startswith(prefix):
            return value
        kid = Masker.key_id_of(value)
        try:
            raw = masker.unmask(value)
        except KeyError_ as exc:
            raise RekeyError(f"row {where}, {col}: {exc}; batch rolled back") from None
        counts[kid][col] += 1
        return masker.mask(raw)

    cols = "masked_ip, masked_device_id"
    async with conn.transaction():
        if phase == "date":
            rows = await conn.fetch(page_by_date_sql(table, first=last is None),
                                    TOKEN_SQL, prefix, size, *(() if last is None else last))
        elif phase == "message_id":
            rows = await conn.fetch(
                f"SELECT message_id AS id, {cols} FROM {table} "
                f"WHERE message_id > $3{undated} AND ({_NEEDS}) ORDER BY message_id LIMIT $4 FOR UPDATE",
                TOKEN_SQL, prefix, last or "", size,
            )
        else:  # rows without a message id that hold tokens anyway (rare: written by hand)
            # ctid is unique only within one heap: on a partitioned table the partition (tableoid) is part of it.
            rows = await conn.fetch(
                f"SELECT tableoid::oid AS part, ctid AS id, {cols} FROM {table} "
                f"WHERE message_id IS NULL AND ({_NEEDS}) LIMIT $3 FOR UPDATE",
                TOKEN_SQL, prefix, size,
            )
        if not rows:
            return 0, last, counts
        ids, ips, devs = [], [], []
        for r in rows:
            where = f"ctid={r['id']}" if phase == "ctid" else f"message_id={r['id']}"
            ids.append(r["id"])
            ips.append(remask(r["masked_ip"], "masked_ip", where))
            devs.append(remask(r["masked_device_id"], "masked_device_id", where))
        update = f"UPDATE {table} AS t SET masked_ip = v.ip, masked_device_id = v.dev "
        if phase == "date":
            days = [r["day"] for r in rows]
            await conn.execute(update_by_date_sql(table), ids, days, ips, devs, days[0], days[-1])
            last = (rows[-1]["day"], rows[-1]["id"])
        elif phase == "message_id":
            await conn.execute(
                update + "FROM unnest($1::text[], $2::text[], $3::text[]) AS v(id, ip, dev) WHERE t.message_id = v.id"
                + (" AND t.create_date IS NULL" if by_date else ""),
                ids, ips, devs,
            )
            last = rows[-1]["id"]
        else:
            await conn.execute(
                update + "FROM unnest($1::oid[], $2::tid[], $3::text[], $4::text[]) AS v(part, id, ip, dev) "
                "WHERE t.tableoid = v.part AND t.ctid = v.id",
                [r["part"] for r in rows], ids, ips, devs,
            )
    return len(rows), last, counts


def add_arguments(rk: argparse.ArgumentParser) -> None:
    rk.add_argument("--batch-size", type=int, default=1000, help="rows per transaction (default 1000)")
    rk.add_argument("--max-batches", type=int, help="stop after this many batches (a rerun continues)")
    rk.add_argument("--dry-run", action="store_true", help="only report what would change")


async def rekey_command(settings: Settings, args: argparse.Namespace) -> int:
    """``python -m pipeline rekey``: print the JSON report on stdout; exit 0 even if stopped early."""
    from ..embedded import embedded
    from ..clients import connect_postgres, masker_for

    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        raise RekeyError("--batch-size and --max-batches must be at least 1")
    async with embedded(settings, broker=False) as effective:
        masker = await masker_for(effective)
        conn = await connect_postgres(effective)
        try:
            report = await rekey(conn, effective.postgres.table, masker, batch_size=args.batch_size,
                                 max_batches=args.max_batches, dry_run=args.dry_run,
                                 progress_interval=effective.pipeline.progress_interval)
        finally:
            await conn.close()
    sys.stdout.write(orjson.dumps(report).decode() + "\n")
    sys.stdout.flush()
    return 0
