"""``python -m pipeline erase --user-id U …``: delete every row of some users (right to erasure).

One ``DELETE … WHERE user_id = ANY(…)`` on the parent table per batch of users, each batch its
own transaction: a user's rows go all at once, across every partition, or not at all. The
audit record is written first (an erasure that cannot be audited is not done) and again with
the counts; it carries SHA-256 fingerprints of the user ids, never the ids. Erasure reaches
the table only: see the README for what keeps a copy (SQS, the DLQ, backups).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

import asyncpg
import orjson

from ..audit import fingerprint, write_audit
from ..errors import EXIT_CONFIG
from ..settings import Settings

__all__ = ["erase", "add_arguments", "command"]


async def erase(conn: asyncpg.Connection, table: str, user_ids: list[str], *, batch_size: int = 100) -> dict[str, Any]:
    """Delete the rows of ``user_ids``; return rows deleted per partition (the table itself when unpartitioned)."""
    by_partition: Counter[str] = Counter()
    for i in range(0, len(user_ids), batch_size):
        rows = await conn.fetch(
            f"WITH gone AS (DELETE FROM {table} WHERE user_id = ANY($1::text[]) RETURNING tableoid) "
            "SELECT c.relname::text AS part, count(*) AS n FROM gone JOIN pg_class c ON c.oid = gone.tableoid GROUP BY 1",
            user_ids[i:i + batch_size])
        by_partition.update({r["part"]: r["n"] for r in rows})
    return {"table": table, "users": len(user_ids), "rows_deleted": sum(by_partition.values()),
            "by_partition": dict(sorted(by_partition.items()))}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Delete every row of the given users, across all partitions, one transaction per batch of users. "
                     "Prints a JSON report (rows deleted per partition) and writes an audit record without the ids. "
                     "SQS queues, the DLQ and backups keep their copies (see README).")
    p.add_argument("--user-id", action="append", required=True, metavar="U", help="a user to erase (repeat for more)")
    p.add_argument("--batch-size", type=int, default=100, help="users per transaction (default: %(default)s)")


async def command(settings: Settings, args: argparse.Namespace) -> int:
    from ..clients import connect_postgres
    from ..embedded import embedded
    from ..errors import MIGRATE_HINT, PreflightError

    users = list(dict.fromkeys(args.user_id))
    if any(not u for u in users) or args.batch_size < 1:
        print("error: --user-id must not be empty and --batch-size must be >= 1", file=sys.stderr)
        return EXIT_CONFIG
    table = settings.postgres.table
    hashes = [fingerprint(u) for u in users]
    write_audit(settings, "erase", refusal="nothing erased", phase="start", table=table, users=len(users),
                user_id_sha256=hashes)
    async with embedded(settings, broker=False, key=False) as effective:
        conn = await connect_postgres(effective)
        try:
            report = await erase(conn, table, users, batch_size=args.batch_size)
        except asyncpg.UndefinedTableError:
            raise PreflightError(f"table {table} does not exist yet; {MIGRATE_HINT}") from None
        finally:
            await conn.close()
    write_audit(settings, "erase", refusal="the rows are erased but the record of it is missing", phase="done",
                table=table, users=len(users), user_id_sha256=hashes, rows_deleted=report["rows_deleted"],
                by_partition=report["by_partition"])
    print(orjson.dumps(report).decode())
    return 0
