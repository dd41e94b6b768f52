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
import shlex
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, TextIO

__all__ = ["interactive", "invocation", "live_progress", "progress_bar", "print_summary", "BarMath", "log_console"]


def interactive(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return stream.isatty() and os.environ.get("TERM") != "dumb"


def invocation() -> str:
    """The command that reaches this CLI again, for hints: bare ``python`` is often not the venv's.

    ``sys.executable`` is the interpreter running now (the venv's, if one runs us), shown
    relative to the working directory when it lies under it (``.venv/bin/python -m pipeline``).
    """
    exe = Path(sys.executable)
    try:
        rel = exe.relative_to(Path.cwd())
        shown = str(rel) if len(rel.parts) > 1 else f"./{rel}"
    except ValueError:
        shown = str(exe)
    return f"{shlex.quote(shown)} -m pipeline"


def log_console(file: TextIO | None = None) -> Any:
    """A rich Console that never breaks a line itself: the terminal may wrap a long log line at its
    edge, but rich must not insert newlines (it would cut ``PIPELINE_SQS__QUEUE_URL`` in two)."""
    from rich.console import Console

    return Console(file=file or sys.stderr, soft_wrap=True)


def _bar(*columns: Any) -> Any:
    """The one rich progress bar: on stderr, never wrapped by rich, with what is printed to stderr meanwhile above it."""
    from rich.progress import Progress

    return Progress(*columns, console=log_console(sys.stderr), redirect_stdout=False, redirect_stderr=True)


@contextlib.contextmanager
def progress_bar(total: int, description: str = "sending") -> Iterator[Callable[[int], None] | None]:
    """Messages done of ``total`` (``loadgen``, ``bench`` filling its queues); yields ``advance(n)``.

    Only on a terminal: elsewhere it yields None and nothing is drawn, so logs stay clean.
    """
    if not interactive():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0:>7.0f} msg/s")

    with _bar("{task.description}", BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


class BarMath:
    """What the bar shows, kept to what the summary counts: acked messages against a total that
    never exceeds the real work.

    The total is ``acked + the queue's backlog`` (visible, in flight, delayed; what we hold is in
    flight). A backlog snapshot is older than the moment we see it, and whatever was acked in
    between is already gone from it, so it is added to ``acked`` as of the previous refresh
    (before the snapshot could have been taken), not as of now: adding today's count would count
    those messages twice and overshoot. The rate is rows inserted per second, the summary's.
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.acked_before = 0
        self.seen: object = None
        self.estimate: int | None = None
        self.last_inserted, self.last_t, self.rate = 0, started, 0.0

    def total(self, acked: int, backlog: dict | None) -> int | None:
        if backlog is not self.seen:
            self.seen = backlog
            self.estimate = self.acked_before + sum(backlog.values()) if backlog else None
        self.acked_before = acked
        return None if self.estimate is None else max(self.estimate, acked)

    def rows_per_s(self, inserted: int, now: float, window: float = 1.0) -> float:
        """Rows inserted per second over the last ``window`` seconds (the live figure)."""
        if now - self.last_t >= window:
            self.rate = (inserted - self.last_inserted) / (now - self.last_t)
            self.last_inserted, self.last_t = inserted, now
        return self.rate

    def average(self, inserted: int, now: float) -> float:
        """The run's rate as the summary computes it: rows inserted over the whole run."""
        elapsed = now - self.started
        return inserted / elapsed if elapsed > 0 else 0.0


def _quiet_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _detail(stats: Any, rate: float, restarts: int) -> str:
    text = f"{stats.inserted:,} inserted · {stats.duplicates:,} duplicates · {stats.rejected:,} rejected · {rate:,.0f} rows/s"
    conc = getattr(stats, "concurrency", None)
    if conc:  # the adaptive limits: receive and delete calls allowed at once
        text += f" · SQS calls receive {conc.get('receive', '-')} / delete {conc.get('delete', '-')}"
    return text + (f" · {restarts} worker restarts" if restarts else "")


@contextlib.asynccontextmanager
async def live_progress(runtime: Any, refresh: float = 0.25) -> AsyncIterator[None]:
    """Show a bar of acked messages against acked + the queue's backlog until the block exits.

    While it runs, log records go above the bar instead of through it, and INFO records
    (the bar and the final table say the same) are hidden unless ``--log-level DEBUG``.
    The final frame shows the whole run's rate, the number the summary prints.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    progress = _bar(
        TextColumn("[bold]draining messages"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    task = progress.add_task("drain", total=None, detail="")
    stats = runtime.stats
    math = BarMath(getattr(stats, "started", time.monotonic()))
    root = logging.getLogger()
    original = sys.stderr
    handlers = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and h.stream is original]

    def restarts() -> int:
        return getattr(runtime, "worker_restarts", 0)

    async def update() -> None:
        while True:
            rate = math.rows_per_s(stats.inserted, time.monotonic())
            progress.update(task, completed=stats.acked, total=math.total(stats.acked, runtime.backlog),
                            detail=_detail(stats, rate, restarts()))
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
            progress.update(task, completed=stats.acked, total=math.total(stats.acked, runtime.backlog) or stats.acked,
                            detail=_detail(stats, math.average(stats.inserted, time.monotonic()), restarts()))
            for h in handlers:
                h.removeFilter(_quiet_info)
                h.setStream(original)


def print_summary(summary: dict, stream: TextIO | None = None) -> None:
    """The run's summary as a table, for people; scripts read the JSON line on stdout."""
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
                       ("released", "released on stop"), ("worker_restarts", "worker restarts")):
        if key == "worker_restarts" and key not in summary:
            continue
        table.add_row(label, f"{summary.get(key, 0):,}")
    for dep, n in sorted(summary.get("errors", {}).items()):
        table.add_row(f"errors: {dep}", f"{n:,}", style="yellow")
    table.add_row("elapsed", f"{summary.get('elapsed_s', 0):,.1f} s")
    table.add_row("rate", f"{summary.get('rate_per_s', 0):,.1f} rows/s")
    log_console(stream or sys.stderr).print(table)
