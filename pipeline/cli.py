"""``python -m pipeline COMMAND``: the parser, the registry of commands, and one error line.

Every command is registered once below with its options and its coroutine; the parser, the
help and the log level all come from that registry. Every failure an operator can cause (a
bad config key, a missing key, an unreachable service) ends as one ``error: …`` line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from stages.masking import KeyError_

from . import aio, commands
from .check import check
from .console import invocation
from .errors import EXIT_CONFIG, EXIT_FAILURE, PreflightError, describe
from .harness import bench, loadgen
from .logs import setup_logging
from .pii import rekey, unmask
from .table import erase, migrate_cmd, retention
from .settings import ConfigError, Settings, load_settings

__all__ = ["main", "Command", "COMMANDS", "log_level"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Settings, argparse.Namespace], Awaitable[int]]
    prints_results: bool = False  # its output is the point: INFO log lines would bury it
    offline: Callable[[argparse.Namespace], int | None] | None = None  # runs without config when it returns a code


COMMANDS: tuple[Command, ...] = (
    Command("run", "stream SQS into PostgreSQL until SIGINT/SIGTERM", commands.run_arguments, commands.run_command),
    Command("migrate", "create or adapt the user_logins table (--partition: convert it to monthly partitions, online)",
            migrate_cmd.add_arguments, migrate_cmd.command),
    Command("retention", "remove rows older than N days: drop old partitions, delete the rest in batches (audited)",
            retention.add_arguments, retention.command),
    Command("erase", "delete every row of the given users across all partitions (audited, no ids in the record)",
            erase.add_arguments, erase.command),
    Command("check", "check config, SQS (queue and DLQ) and PostgreSQL (table); one line per finding",
            commands.no_arguments, check, prints_results=True),
    Command("keygen", "print a fresh masking key for PIPELINE_MASKING__KEY", commands.keygen_arguments,
            commands.keygen_command, prints_results=True, offline=commands.keygen_offline),
    Command("unmask", "print the originals of masked values (audited), with any key of the ring",
            unmask.add_arguments, unmask.unmask_command, prints_results=True),
    Command("rekey", "re-mask rows written under older keys with the active key (batched, resumable)",
            rekey.add_arguments, rekey.rekey_command),
    Command("show", "print the newest rows of the table (masked) and its row count", commands.show_arguments,
            commands.show_command, prints_results=True),
    Command("redrive", "move dead letters back to the source queue (after a fix); prints a JSON summary",
            commands.redrive_arguments, commands.redrive_command),
    Command("loadgen", "fill the configured queue with realistic login events", loadgen.add_arguments, loadgen.command),
    Command("bench", "measure the pipeline next to the broker's and the database's ceilings", bench.add_arguments,
            bench.command),
)
_BY_NAME = {c.name: c for c in COMMANDS}
RESULT_COMMANDS = frozenset(c.name for c in COMMANDS if c.prints_results)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=invocation(), description="Stream user-login events from SQS into PostgreSQL, masking their PII.")
    p.add_argument("--config", type=Path, help="TOML config file (default: $PIPELINE_CONFIG or ./config.toml)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="JSON log lines on stderr at this level and above (default: WARNING for commands that "
                        f"print results: {', '.join(sorted(RESULT_COMMANDS))}; INFO otherwise)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:  # every COMMAND --help opens with what it does
        c.add_arguments(sub.add_parser(c.name, help=c.help, description=f"{c.help[0].upper()}{c.help[1:]}."))
    return p


def log_level(args: argparse.Namespace) -> str:
    return args.log_level or ("WARNING" if args.command in RESULT_COMMANDS else "INFO")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(log_level(args))
    command = _BY_NAME[args.command]
    if command.offline is not None and (code := command.offline(args)) is not None:
        return code
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _fail(f"config: {exc}", EXIT_CONFIG)
    try:
        return aio.run(command.run(settings, args))
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
