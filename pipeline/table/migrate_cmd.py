"""``python -m pipeline migrate [--partition]``: create or adapt the table, or convert it online.

Plain ``migrate`` runs ``schema.migrate`` with the configured layout (what ``check`` reports
as pending). ``--partition`` converts an unpartitioned table (``pipeline.table.convert``): it
logs a progress line per batch and prints one JSON summary; rerun after an interruption to continue.
"""

from __future__ import annotations

import argparse
import sys

import orjson

from ..settings import Settings

__all__ = ["add_arguments", "command"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partition", action="store_true",
                   help="convert an unpartitioned table into a monthly-partitioned one, online (batched, resumable)")
    p.add_argument("--batch-blocks", type=int, default=1000,
                   help="with --partition: 8 kB heap blocks copied per transaction (default: %(default)s)")
    p.add_argument("--max-batches", type=int, metavar="N", help="with --partition: stop after N batches (a rerun continues)")
    p.add_argument("--keep-old", action="store_true",
                   help="with --partition: keep the old table as <table>_unpartitioned (retention and erase do not see it)")


async def command(settings: Settings, args: argparse.Namespace) -> int:
    from ..clients import connect_postgres
    from ..embedded import embedded
    from ..schema import migrate
    from .convert import convert
    from .partitions import Layout

    if args.batch_blocks < 1 or (args.max_batches is not None and args.max_batches < 0):
        print("error: --batch-blocks must be >= 1 and --max-batches >= 0", file=sys.stderr)
        return 2
    table = settings.postgres.table
    async with embedded(settings, broker=False, key=False) as effective:
        layout = Layout.of(effective)
        conn = await connect_postgres(effective)
        try:
            if args.partition:
                result = await convert(conn, table, layout, batch_blocks=args.batch_blocks, keep_old=args.keep_old,
                                       max_batches=args.max_batches)
            else:
                result = {"table": table, "changes": await migrate(conn, table, layout)}
        finally:
            await conn.close()
    print(orjson.dumps(result).decode())
    return 0
