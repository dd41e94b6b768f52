"""The service's own commands: run, show, keygen, redrive (``migrate`` lives with the table, in ``pipeline.table``).

Each command is a pair: ``*_arguments(parser)`` declares its options and ``async *(settings,
args) -> int`` runs it. ``pipeline.cli`` registers them next to the satellites' commands
(``unmask``, ``rekey``, ``loadgen``, ``bench``), which follow the same shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import asyncpg
import orjson

from stages.masking import KeyError_, generate_key

from .clients import connect_postgres
from .console import interactive, invocation, live_progress, print_summary
from .embedded import embedded
from .errors import EXIT_CONFIG, MIGRATE_HINT, PreflightError
from .keyring import parse_plain, wrap_key
from .redrive import redrive
from .runner import Runtime, run
from .settings import Settings
from .workers import run_workers

__all__ = [
    "run_arguments", "run_command", "show_arguments", "show_command", "keygen_arguments",
    "keygen_offline", "keygen_command", "redrive_arguments", "redrive_command", "no_arguments", "RefusedRun",
]

log = logging.getLogger("pipeline")


class RefusedRun(PreflightError):
    """The run ended, but left work it could not finish (messages whose dead letters SQS refused)."""


def no_arguments(p: argparse.ArgumentParser) -> None:
    """For commands configured by the config file alone."""


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--until-empty", action="store_true",
                   help="exit once the queue has no visible or in-flight messages and all is flushed and acked")


async def run_command(settings: Settings, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # second signal: stop now
            log.warning("second signal, stopping without draining")
            main_task.cancel()  # type: ignore[union-attr]
            return
        log.info("signal received, draining", extra={"signal": signal.Signals(signum).name})
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    async with embedded(settings) as effective:
        rt = Runtime(effective)
        bar = args.until_empty and interactive()
        async with live_progress(rt) if bar else contextlib.nullcontext():
            if effective.pipeline.processes > 1:
                summary = await run_workers(effective, until_empty=args.until_empty, stop=stop, runtime=rt)
            else:
                summary = await run(effective, until_empty=args.until_empty, stop=stop, runtime=rt)
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
        sys.stdout.flush()
        if bar:
            print_summary(summary)
        if effective is not settings and settings.embedded_postgres:
            print(
                f"Rows are in the embedded PostgreSQL ({settings.pipeline.state_dir / 'pg'}). "
                f"Look at them with: {invocation()} show",
                file=sys.stderr,
            )
    stuck = summary.get("not_dead_lettered") or {}
    if stuck and args.until_empty:  # they are still on the source queue: it could not be emptied
        why = ", ".join(f"{n} by {code}" for code, n in sorted(stuck.items()))
        raise RefusedRun(f"{sum(stuck.values())} message(s) could not be dead-lettered (refused {why}); "
                         "they stay on the source queue until the DLQ accepts them")
    return 0


def show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=10, help="rows to print (default: %(default)s)")


async def show_command(settings: Settings, args: argparse.Namespace) -> int:
    async with embedded(settings, broker=False, key=False) as effective:
        conn = await connect_postgres(effective)
        try:
            table = effective.postgres.table
            count = await conn.fetchval(f"SELECT count(*) FROM {table}")
            rows = await conn.fetch(f"SELECT * FROM {table} ORDER BY create_date DESC NULLS LAST LIMIT $1", args.limit)
        except asyncpg.UndefinedTableError:
            where = (f" (this is the embedded PostgreSQL in {settings.pipeline.state_dir / 'pg'} of the current folder: "
                     "run `show` from the folder `run` ran in)" if settings.embedded_postgres else "")
            raise PreflightError(f"table {table} does not exist yet; {MIGRATE_HINT}{where}") from None
        finally:
            await conn.close()
    for r in rows:
        print(orjson.dumps(dict(r), default=str).decode())
    print(f"{count} rows in {table}", file=sys.stderr)
    return 0


def keygen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-id", help="key id to embed (default: random)")
    p.add_argument("--kms-key-id", nargs="?", const="", metavar="ARN",
                   help="print the key wrapped under this KMS key ('<id>:kms:<blob>'; no ARN = masking.kms_key_id)")
    p.add_argument("--wrap-stdin", action="store_true",
                   help="with --kms-key-id: wrap the '<id>:<base64>' key read from stdin instead of a new one")


def keygen_offline(args: argparse.Namespace) -> int | None:
    """A plain key needs no configuration (and must not fail on a broken one); KMS wrapping does."""
    if args.kms_key_id is not None:
        return None
    try:
        print(generate_key(args.key_id).encode())
    except KeyError_ as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


async def keygen_command(settings: Settings, args: argparse.Namespace) -> int:
    key = parse_plain(sys.stdin.readline()) if args.wrap_stdin else None
    print(await wrap_key(settings, args.kms_key_id or settings.masking.kms_key_id, key, args.key_id))
    return 0


def redrive_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max", type=int, metavar="N", help="move at most N messages (default: all)")
    p.add_argument("--trust-unsigned-notes", action="store_true", help=(
        "promote the identity noted on dead letters that carry no source_signature (written by a version before "
        "it signed them); only if nobody but the pipeline can send to the DLQ"))


async def redrive_command(settings: Settings, args: argparse.Namespace) -> int:
    summary = await redrive(settings, limit=args.max, trust_unsigned_notes=args.trust_unsigned_notes)
    print(orjson.dumps(summary).decode())
    return 0
