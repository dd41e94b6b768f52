"""What a human at a terminal sees: a live progress bar and a summary table, on stderr.

Only for ``run --until-empty`` with stderr on a terminal; containers, pipes and tests get
the JSON log lines unchanged. stdout is never touched, so the JSON summary line stays
machine-readable. rich is imported lazily: the streaming service never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from typing import Any, AsyncIterator, TextIO

__all__ = ["interactive", "live_progress", "print_summary"]


def interactive(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return stream.isatty() and os.environ.get("TERM") != "dumb"


def _quiet_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


@contextlib.asynccontextmanager
async def live_progress(runtime: Any, refresh: float = 0.25) -> AsyncIterator[None]:
    """Show a bar of acked messages against acked + the queue's backlog until the block exits.

    While it runs, log records go above the bar instead of through it, and INFO records
    (the bar and the final table say the same) are hidden unless ``--log-level DEBUG``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr)
    progress = Progress(
        TextColumn("[bold]draining"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(), console=console, redirect_stdout=False, redirect_stderr=True,
    )
    task = progress.add_task("drain", total=None, detail="")
    stats = runtime.stats
    root = logging.getLogger()
    original = sys.stderr
    handlers = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and h.stream is original]

    async def update() -> None:
        last, last_t, rate = 0, time.monotonic(), 0.0
        seen: dict | None = None
        total: int | None = None
        while True:
            now = time.monotonic()
            if now - last_t >= 1:
                rate, last, last_t = (stats.acked - last) / (now - last_t), stats.acked, now
            if runtime.backlog is not seen:  # a fresh snapshot: what is acked now + what SQS still has
                seen = runtime.backlog
                total = stats.acked + sum(seen.values()) if seen else None
            progress.update(
                task, completed=stats.acked, total=None if total is None else max(total, stats.acked),
                detail=f"{stats.inserted} inserted · {stats.duplicates} duplicates · {stats.rejected} rejected · {rate:,.0f} msg/s",
            )
            await asyncio.sleep(refresh)

    with progress:
        for h in handlers:
            h.setStream(sys.stderr)  # rich's proxy: lines print above the live bar
            if root.level > logging.DEBUG:
                h.addFilter(_quiet_info)
        updater = asyncio.create_task(update())
        try:
            yield
        finally:
            updater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await updater
            progress.update(task, completed=stats.acked, total=stats.acked + sum(runtime.backlog.values()))
            for h in handlers:
                h.removeFilter(_quiet_info)
                h.setStream(original)


def print_summary(summary: dict, stream: TextIO | None = None) -> None:
    """The run's summary as a table, for people; scripts read the JSON line on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="run summary", title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, label in (("received", "received"), ("inserted", "inserted (rows written)"),
                       ("duplicates", "duplicates (already stored)"), ("rejected", "rejected (dead-lettered)")):
        table.add_row(label, f"{summary.get(key, 0):,}")
    for rule, n in sorted(summary.get("rejected_by_rule", {}).items()):
        table.add_row(f"  {rule}", f"{n:,}", style="dim")
    for key, label in (("acked", "acked (deleted from SQS)"), ("ack_failures", "ack failures"),
                       ("released", "released on stop")):
        table.add_row(label, f"{summary.get(key, 0):,}")
    for dep, n in sorted(summary.get("errors", {}).items()):
        table.add_row(f"errors: {dep}", f"{n:,}", style="yellow")
    table.add_row("elapsed", f"{summary.get('elapsed_s', 0):,.1f} s")
    table.add_row("rate", f"{summary.get('rate_per_s', 0):,.1f} rows/s")
    Console(file=stream or sys.stderr).print(table)
