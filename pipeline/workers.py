"""``[pipeline] processes = N``: N worker processes, each a whole pipeline on the same queue.

One pipeline is one Python process, so it uses about one core. On a host with more cores,
more consumers of the same queue need no coordination: SQS hands a message to one consumer
at a time, and the unique ``message_id`` makes the rare redelivery to another worker harmless.

The parent starts the workers (spawned, so none inherits an event loop or a socket), forwards
SIGINT/SIGTERM (the first drains, a second stops at once, as with one process), shows their
summed counters to the progress bar, and returns one summary: the sum of theirs.
With ``http.port`` set, worker ``i`` serves its probes and metrics on ``port + i``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
from collections import Counter
from typing import Any

from .settings import Settings

__all__ = ["run_workers", "merge_summaries"]

log = logging.getLogger("pipeline")

_MP = multiprocessing.get_context("spawn")
_COUNTERS = ("received", "inserted", "duplicates", "rejected", "acked", "ack_failures", "released", "extended", "batches")
_SNAPSHOT_S = 0.5


def merge_summaries(summaries: list[dict]) -> dict:
    """The workers' summaries as one: counts summed, the longest elapsed time, the overall rate."""
    out: dict[str, Any] = {}
    for s in summaries:
        for k, v in s.items():
            if isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
                merged = Counter(out.get(k, {}))
                merged.update(v)
                out[k] = dict(merged)
            elif isinstance(v, dict):
                out.setdefault(k, v)
            elif k in ("elapsed_s", "rate_per_s"):
                continue
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    elapsed = max((s.get("elapsed_s", 0.0) for s in summaries), default=0.0)
    out["elapsed_s"] = elapsed
    out["rate_per_s"] = round(out.get("inserted", 0) / elapsed, 1) if elapsed > 0 else 0.0
    out["processes"] = len(summaries)
    return out


def _worker(settings: Settings, until_empty: bool, index: int, log_level: str, conn: Any) -> None:
    """A worker process: one pipeline; snapshots and the summary go to the parent over ``conn``."""
    from .logs import setup_logging
    from .runner import PreflightError, Runtime, run

    setup_logging(log_level)

    class _Tag(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.worker = index
            return True

    for h in logging.getLogger().handlers:
        h.addFilter(_Tag())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards signals: a terminal's ^C reaches us once
    if settings.http.port:
        settings = settings.model_copy(update={"http": settings.http.model_copy(update={"port": settings.http.port + index})})

    async def main() -> dict:
        stop = asyncio.Event()
        task = asyncio.current_task()

        def on_term() -> None:
            if stop.is_set():
                task.cancel()  # type: ignore[union-attr]
            stop.set()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
        rt = Runtime(settings)

        async def snapshots() -> None:
            while True:
                await asyncio.sleep(_SNAPSHOT_S)
                conn.send(("stats", {k: getattr(rt.stats, k) for k in _COUNTERS}, rt.backlog))

        sender = asyncio.create_task(snapshots())
        try:
            return await run(settings, until_empty=until_empty, stop=stop, runtime=rt)
        finally:
            sender.cancel()

    try:
        try:
            import uvloop

            summary = uvloop.run(main())
        except ImportError:  # pragma: no cover
            summary = asyncio.run(main())
        conn.send(("summary", summary))
    except PreflightError as exc:
        conn.send(("error", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - one line for the parent, which exits non-zero
        conn.send(("error", f"worker {index}: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def run_workers(settings: Settings, *, until_empty: bool, stop: asyncio.Event, runtime: Any = None,
                      log_level: str | None = None) -> dict:
    """Run ``settings.pipeline.processes`` workers until ``stop`` (or the queue is empty); return the summed summary."""
    from .runner import PreflightError

    n = settings.pipeline.processes
    level = log_level or logging.getLevelName(logging.getLogger().level)
    procs, pipes = [], []
    for i in range(n):
        recv, send = _MP.Pipe(duplex=False)
        p = _MP.Process(target=_worker, args=(settings, until_empty, i, level, send), name=f"pipeline-worker-{i}")
        p.start()
        send.close()
        procs.append(p)
        pipes.append(recv)
    log.info("workers started", extra={"processes": n, "pids": [p.pid for p in procs]})
    snapshots: list[dict] = [{} for _ in range(n)]
    summaries: list[dict | None] = [None] * n
    errors: list[str] = []

    def signal_all() -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                p.terminate()  # SIGTERM: the first drains, a second stops at once

    async def listen(i: int) -> None:
        while True:
            try:
                msg = await asyncio.to_thread(pipes[i].recv)
            except EOFError:
                return
            if msg[0] == "stats":
                snapshots[i] = msg[1]
                if runtime is not None:
                    for k in _COUNTERS:
                        setattr(runtime.stats, k, sum(s.get(k, 0) for s in snapshots))
                    if i == 0 and msg[2]:
                        runtime.backlog = msg[2]
            elif msg[0] == "summary":
                summaries[i] = msg[1]
            else:
                errors.append(msg[1])
                stop.set()  # one worker failed: the others drain and stop too

    async def forward() -> None:
        await stop.wait()
        signal_all()

    forwarder = asyncio.create_task(forward())
    started = time.monotonic()
    try:
        await asyncio.gather(*(listen(i) for i in range(n)))
    except asyncio.CancelledError:  # a second signal: tell the workers to stop at once
        signal_all()
        raise
    finally:
        forwarder.cancel()
        for p in procs:
            await asyncio.to_thread(p.join, settings.pipeline.grace_seconds + 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise PreflightError(errors[0])
    missing = [i for i, s in enumerate(summaries) if s is None]
    if missing:
        raise RuntimeError(f"worker {missing[0]} exited with code {procs[missing[0]].exitcode} without a summary")
    summary = merge_summaries([s for s in summaries if s is not None])
    summary["elapsed_s"] = round(max(summary["elapsed_s"], time.monotonic() - started), 3)
    summary["rate_per_s"] = round(summary.get("inserted", 0) / summary["elapsed_s"], 1) if summary["elapsed_s"] else 0.0
    return summary
