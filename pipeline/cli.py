"""``python -m pipeline``: run, migrate, check, keygen, unmask, rekey, redrive, show, loadgen, bench.

Every failure an operator can cause (a bad config key, a missing key, an unreachable
service) ends as one ``error: …`` line on stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import asyncpg
import orjson

from stages.masking import KeyError_, generate_key

from . import aio
from .harness.bench import add_arguments as bench_arguments
from .harness.bench import command as bench_command
from .check import check
from .console import interactive, invocation, live_progress, print_summary
from .embedded import embedded
from .errors import MIGRATE_HINT, describe
from .harness.loadgen import add_arguments as loadgen_arguments
from .harness.loadgen import command as loadgen_command
from .logs import setup_logging
from .runner import PreflightError, Runtime, connect_postgres, run
from .schema import migrate
from .settings import ConfigError, Settings, load_settings
from .workers import run_workers

log = logging.getLogger("pipeline")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=invocation(), description="Stream user-login events from SQS into PostgreSQL, masking their PII.")
    p.add_argument("--config", type=Path, help="TOML config file (default: $PIPELINE_CONFIG or ./config.toml)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="JSON log lines on stderr at this level and above (default: WARNING for commands that "
                        "print results: show, unmask, check, keygen; INFO otherwise)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="stream SQS into PostgreSQL until SIGINT/SIGTERM")
    r.add_argument("--until-empty", action="store_true",
                   help="exit once the queue has no visible or in-flight messages and all is flushed and acked")
    sub.add_parser("migrate", help="create or adapt the user_logins table")
    k = sub.add_parser("keygen", help="print a fresh masking key for PIPELINE_MASKING__KEY")
    k.add_argument("--key-id", help="key id to embed (default: random)")
    k.add_argument("--kms-key-id", nargs="?", const="", metavar="ARN",
                   help="print the key wrapped under this KMS key ('<id>:kms:<blob>'; no ARN = masking.kms_key_id)")
    k.add_argument("--wrap-stdin", action="store_true",
                   help="with --kms-key-id: wrap the '<id>:<base64>' key read from stdin instead of a new one")
    u = sub.add_parser("unmask", help="print the originals of masked values (audited), with any key of the ring")
    u.add_argument("values", nargs="*", metavar="VALUE", help="masked values; '-' or none: one per line on stdin")
    u.add_argument("--query", metavar="SQL",
                   help="print the rows of 'SELECT <columns>|* FROM <table> [WHERE …] [ORDER BY …] [LIMIT n]' as JSON "
                        "lines, every token unmasked (that form only: literals, no functions; see README)")
    u.add_argument("--where", metavar="COND", help="the same, as a condition on the table: \"user_id = '…'\"")
    u.add_argument("--columns", metavar="COLS", help="with --where: comma-separated columns to print (default: all)")
    u.add_argument("--limit", type=int, metavar="N", help="with --where: print at most N rows")
    rk = sub.add_parser("rekey", help="re-mask rows written under older keys with the active key (batched, resumable)")
    rk.add_argument("--batch-size", type=int, default=1000, help="rows per transaction (default 1000)")
    rk.add_argument("--max-batches", type=int, help="stop after this many batches (a rerun continues)")
    rk.add_argument("--dry-run", action="store_true", help="only report what would change")
    s = sub.add_parser("show", help="print the newest rows of the table (masked) and its row count")
    s.add_argument("--limit", type=int, default=10, help="rows to print (default: %(default)s)")
    sub.add_parser("check", help="check config, SQS (queue and DLQ) and PostgreSQL (table); one line per finding")
    rd = sub.add_parser("redrive", help="move dead letters back to the source queue (after a fix); prints a JSON summary")
    rd.add_argument("--max", type=int, metavar="N", help="move at most N messages (default: all)")
    loadgen_arguments(sub.add_parser("loadgen", help="fill the configured queue with realistic login events"))
    bench_arguments(sub.add_parser("bench", help="measure the pipeline next to the broker's and the database's ceilings"))
    for action in sub._choices_actions:  # every COMMAND --help opens with what it does
        command = sub.choices[action.dest]
        command.description = command.description or f"{action.help[0].upper()}{action.help[1:]}."
    return p


RESULT_COMMANDS = {"show", "unmask", "check", "keygen"}  # their output is the point: INFO lines would bury it


def log_level(args: argparse.Namespace) -> str:
    return args.log_level or ("WARNING" if args.command in RESULT_COMMANDS else "INFO")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(log_level(args))
    if args.command == "keygen" and args.kms_key_id is None:
        try:
            print(generate_key(args.key_id).encode())
        except KeyError_ as exc:
            return _fail(str(exc), EXIT_CONFIG)
        return 0
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _fail(f"config: {exc}", EXIT_CONFIG)
    try:
        return aio.run(COMMANDS[args.command](settings, args))
    except ConfigError as exc:
        return _fail(f"config: {exc}", EXIT_CONFIG)
    except (PreflightError, KeyError_, RuntimeError) as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the backstop: one line, never a traceback
        return _fail(describe(exc, settings), EXIT_FAILURE)


def _fail(message: str, code: int) -> int:
    message = message.replace("python -m pipeline", invocation())  # a hint that works from this shell
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message holds
    return code


async def _run(settings: Settings, args: argparse.Namespace) -> int:
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
        return _fail(f"{sum(stuck.values())} message(s) could not be dead-lettered (refused {why}); "
                     "they stay on the source queue until the DLQ accepts them", EXIT_FAILURE)
    return 0


async def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    async with embedded(settings, broker=False, key=False) as effective:
        conn = await connect_postgres(effective)
        try:
            changes = await migrate(conn, effective.postgres.table)
        finally:
            await conn.close()
    print(orjson.dumps({"table": settings.postgres.table, "changes": changes}).decode())
    return 0


async def _unmask(settings: Settings, args: argparse.Namespace) -> int:
    from .recovery import unmask_command

    return await unmask_command(settings, args)


async def _keygen_kms(settings: Settings, args: argparse.Namespace) -> int:
    from .keyring import parse_plain, wrap_key

    key = parse_plain(sys.stdin.readline()) if args.wrap_stdin else None
    print(await wrap_key(settings, args.kms_key_id or settings.masking.kms_key_id, key, args.key_id))
    return 0


async def _rekey(settings: Settings, args: argparse.Namespace) -> int:
    from .rekey import rekey_command

    return await rekey_command(settings, args)


async def _show(settings: Settings, args: argparse.Namespace) -> int:
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


async def _redrive(settings: Settings, args: argparse.Namespace) -> int:
    from .redrive import redrive

    print(orjson.dumps(await redrive(settings, limit=args.max)).decode())
    return 0


COMMANDS = {"run": _run, "migrate": _migrate, "unmask": _unmask, "show": _show, "check": check,
            "keygen": _keygen_kms, "rekey": _rekey, "loadgen": loadgen_command, "bench": bench_command,
            "redrive": _redrive}
