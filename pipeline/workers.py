"""``[pipeline] processes = N``: N worker processes, each a whole pipeline on the same queue.

One pipeline is one Python process, so it uses about one core. On a host with more cores,
more consumers of the same queue need no coordination: SQS hands a message to one consumer
at a time, and the unique ``message_id`` makes the rare redelivery to another worker harmless.

The parent starts the workers (spawned, so none inherits an event loop or a socket), forwards
SIGINT/SIGTERM (the first drains, a second stops at once, as with one process), shows their
summed counters to the progress bar, and returns one summary: the sum of theirs.
With ``http.port`` set, worker ``i`` serves its probes and metrics on ``port + i``.

A worker that dies (a signal, an OOM kill, a crash, an exit without a summary) must never
leave the service running silently at reduced capacity. It is logged at once (ERROR: index,
pid, exit code or signal) and replaced after a backoff that doubles per consecutive death of
that slot (``BACKOFF_S``). Its messages come back after the visibility timeout and are taken by
the others or its replacement, duplicates deduplicated. Deaths faster than the restart
budget (``RESTART_BUDGET`` within ``RESTART_WINDOW_S``) mean something a restart cannot fix:
the parent stops the rest and exits non-zero (one ``error:`` line), so the orchestrator
restarts the pod and its alerting sees a crash loop. A configuration problem a worker reports
at start-up (``PreflightError``) is fatal at once, as it is with one process.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from stages import backoff as retry_policy

from . import aio
from .settings import Settings

__all__ = ["run_workers", "merge_summaries", "WorkerFailure", "RESTART_BUDGET", "RESTART_WINDOW_S", "BACKOFF_S"]

log = logging.getLogger("pipeline")

# Runtime.stats attribute <- summary key: what the parent's progress bar and probes read.
_STATS_FIELDS = (("received", "received"), ("inserted", "inserted"), ("duplicates", "duplicates"),
                 ("rejected", "rejected"), ("acked", "acked"), ("ack_failures", "ack_failures"),
                 ("released", "released"), ("extended", "visibility_extended"))
_SNAPSHOT_S = 0.5
RESTART_BUDGET = 5  # worker deaths tolerated within RESTART_WINDOW_S; one more and the parent exits non-zero
RESTART_WINDOW_S = 300.0
BACKOFF_S = (0.5, 30.0)  # first restart delay, cap; doubles per consecutive death of the same slot
_STABLE_S = 60.0  # an incarnation that lived this long resets its slot's backoff


class WorkerFailure(RuntimeError):
    """Workers died faster than the restart budget allows; the service must be restarted from outside."""


def merge_summaries(summaries: list[dict]) -> dict:
    """The workers' summaries as one: counts summed, the longest elapsed time, the overall rate."""
    out: dict[str, Any] = {}
    for s in summaries:
        for k, v in s.items():
            if isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
                merged = collections.Counter(out.get(k, {}))
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


def describe_exit(code: int | None) -> str:
    """``SIGKILL`` for a signal, ``exit code 3`` otherwise: what an operator greps for."""
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _worker(settings: Settings, until_empty: bool, index: int, log_level: str, conn: Any) -> None:
    """A worker process: one pipeline; snapshots and the summary go to the parent over ``conn``."""
    from stages.masking import KeyError_

    from .logs import setup_logging
    from .errors import PreflightError
    from .runner import Runtime, run

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
    rt = Runtime(settings)

    async def main() -> dict:
        stop = asyncio.Event()
        task = asyncio.current_task()

        def on_term() -> None:
            if stop.is_set():
                task.cancel()  # type: ignore[union-attr]
            stop.set()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)

        async def snapshots() -> None:
            while True:
                await asyncio.sleep(_SNAPSHOT_S)
                tell(("stats", rt.stats.summary(), rt.backlog))

        loop = asyncio.get_running_loop()
        parent = multiprocessing.parent_process()

        def orphaned() -> None:  # the parent killed (-9, OOM): drain and stop as on SIGTERM, never run on alone
            loop.remove_reader(parent.sentinel)  # type: ignore[union-attr]
            log.error("the parent process is gone: draining and stopping", extra={"worker": index})
            stop.set()

        if parent is not None:  # its sentinel reads end-of-file once the parent has exited
            loop.add_reader(parent.sentinel, orphaned)
        sender = asyncio.create_task(snapshots())
        try:
            return await run(settings, until_empty=until_empty, stop=stop, runtime=rt)
        finally:
            sender.cancel()
            if parent is not None:
                loop.remove_reader(parent.sentinel)

    def tell(message: tuple) -> None:
        try:
            conn.send(message)
        except OSError:  # the parent is gone (and then this worker is draining to stop): nobody to tell
            pass

    try:
        tell(("summary", aio.run(main())))
    except asyncio.CancelledError:  # a second SIGTERM: stopped at once, counts so far
        tell(("summary", rt.stats.summary()))
    except (PreflightError, KeyError_) as exc:  # configuration: a restart cannot fix it
        tell(("fatal", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - a crash: the parent logs it and replaces this worker
        tell(("crash", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _Supervisor:
    """Keeps ``processes`` slots filled until stopped; every incarnation's counts end in the summary."""

    def __init__(self, settings: Settings, until_empty: bool, stop: asyncio.Event, runtime: Any, level: str,
                 target: Callable[..., None], budget: int, window: float, backoff: tuple[float, float]) -> None:
        self.settings, self.until_empty, self.stop, self.runtime = settings, until_empty, stop, runtime
        self.level, self.target, self.budget, self.window, self.backoff = level, target, budget, window, backoff
        self.n = settings.pipeline.processes
        self.live: dict[int, Any] = {}
        self.snapshots: list[dict] = [{} for _ in range(self.n)]
        self.ended: list[dict] = []  # summaries, and the last snapshot of each incarnation that died
        self.deaths: collections.deque[float] = collections.deque()
        self.restarts = self.died = 0
        self.fatal: BaseException | None = None
        self.pool = ThreadPoolExecutor(max_workers=2 * self.n + 2, thread_name_prefix="workers")

    def spawn(self, i: int) -> tuple[Any, Any]:
        p, recv = aio.spawn(self.target, self.settings, self.until_empty, i, self.level, name=f"pipeline-worker-{i}")
        self.live[i] = p
        return p, recv

    def signal_all(self) -> None:
        for p in list(self.live.values()):
            if p.is_alive() and p.pid is not None:
                p.terminate()  # SIGTERM: the first drains, a second stops at once

    def publish(self) -> None:
        """The parent's Runtime shows the sum over every incarnation, dead ones included."""
        if self.runtime is None:
            return
        parts = [*self.ended, *self.snapshots]
        for attr, key in _STATS_FIELDS:
            setattr(self.runtime.stats, attr, sum(p.get(key, 0) for p in parts))
        self.runtime.worker_restarts = self.restarts

    async def listen(self, i: int, pipe: Any) -> tuple[str, Any]:
        while True:
            try:
                msg = await aio.receive(pipe, self.pool)
            except (EOFError, OSError):
                return "died", None
            if msg[0] == "stats":
                self.snapshots[i] = msg[1]
                if msg[2] and self.runtime is not None:
                    self.runtime.backlog = msg[2]
                self.publish()
            else:
                return msg[0], msg[1]

    async def slot(self, i: int, first: tuple[Any, Any]) -> None:
        loop = asyncio.get_running_loop()
        streak = 0
        proc, pipe = first
        while True:
            born = time.monotonic()
            try:
                kind, payload = await self.listen(i, pipe)
            finally:
                pipe.close()
            await loop.run_in_executor(self.pool, proc.join, 10 if kind == "died" else self.settings.pipeline.grace_seconds + 30)
            if proc.is_alive():
                proc.kill()
                await loop.run_in_executor(self.pool, proc.join)
            self.live.pop(i, None)
            self.ended.append(payload if kind == "summary" else self.snapshots[i])
            self.snapshots[i] = {}
            self.publish()
            if kind == "summary":
                return
            if kind == "fatal":
                from .errors import PreflightError

                self.fatal = self.fatal or PreflightError(payload)
                self.stop.set()  # the others drain and stop too
                return
            how = describe_exit(proc.exitcode) if kind == "died" else f"crashed: {payload}"
            self.died += 1
            log.error("worker died", extra={"worker": i, "pid": proc.pid, "exitcode": proc.exitcode, "exit": how,
                                            "stopping": self.stop.is_set()})
            if self.stop.is_set():  # draining anyway; its messages come back after the visibility timeout
                return
            now = time.monotonic()
            self.deaths.append(now)
            while self.deaths and now - self.deaths[0] > self.window:
                self.deaths.popleft()
            if len(self.deaths) > self.budget:
                self.fatal = self.fatal or WorkerFailure(
                    f"worker {i} (pid {proc.pid}) {how}: {len(self.deaths)} worker deaths within "
                    f"{self.window:g} s exceed the restart budget of {self.budget}; stopping the other workers")
                self.stop.set()
                return
            streak = 1 if now - born >= _STABLE_S else streak + 1
            delay = retry_policy.delay(streak, *self.backoff, jitter=0)
            self.restarts += 1
            self.publish()  # worker_restarts, for the progress bar
            log.warning("restarting worker", extra={"worker": i, "in_s": delay, "worker_restarts": self.restarts})
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
                return  # stopped while backing off
            except asyncio.TimeoutError:
                pass
            if self.stop.is_set():
                return
            proc, pipe = self.spawn(i)
            log.info("worker started", extra={"worker": i, "pid": proc.pid, "worker_restarts": self.restarts})

    async def progress(self) -> None:
        """One line for all workers, with what only the parent knows: restarts and live workers."""
        while True:
            await asyncio.sleep(self.settings.pipeline.progress_interval)
            totals = merge_summaries([*self.ended, *self.snapshots])
            log.info("workers progress", extra={
                **{k: totals.get(k, 0) for _, k in _STATS_FIELDS}, "workers_alive": len(self.live),
                "worker_restarts": self.restarts, "worker_deaths": self.died})


async def run_workers(settings: Settings, *, until_empty: bool, stop: asyncio.Event, runtime: Any = None,
                      log_level: str | None = None, target: Callable[..., None] = _worker,
                      restart_budget: int = RESTART_BUDGET, restart_window: float = RESTART_WINDOW_S,
                      backoff: tuple[float, float] = BACKOFF_S) -> dict:
    """Run ``settings.pipeline.processes`` workers until ``stop`` (or the queue is empty); return the summed summary.

    Raises ``PreflightError`` when a worker reports a configuration problem and ``WorkerFailure``
    when workers die faster than ``restart_budget`` per ``restart_window`` seconds.
    """
    level = log_level or logging.getLevelName(logging.getLogger().level)
    sup = _Supervisor(settings, until_empty, stop, runtime, level, target, restart_budget, restart_window, backoff)
    if runtime is not None:
        runtime.worker_restarts = 0
    started = time.monotonic()
    slots = [asyncio.create_task(sup.slot(i, sup.spawn(i)), name=f"worker-slot-{i}") for i in range(sup.n)]
    log.info("workers started", extra={"processes": sup.n, "pids": [p.pid for p in sup.live.values()]})

    async def forward() -> None:
        await stop.wait()
        sup.signal_all()

    helpers = [asyncio.create_task(forward()), asyncio.create_task(sup.progress())]
    try:
        await asyncio.gather(*slots)
    except asyncio.CancelledError:  # a second signal: tell the workers to stop at once
        sup.signal_all()
        raise
    finally:
        for t in helpers:
            t.cancel()
        for i, p in list(sup.live.items()):
            await asyncio.get_running_loop().run_in_executor(sup.pool, p.join, settings.pipeline.grace_seconds + 30)
            if p.is_alive():
                p.kill()
        for t in slots:
            t.cancel()
        await asyncio.gather(*slots, return_exceptions=True)
        sup.pool.shutdown(wait=False)
    if sup.fatal is not None:
        raise sup.fatal
    summary = merge_summaries([s for s in sup.ended if s])
    summary["processes"] = sup.n
    summary["worker_restarts"] = sup.restarts
    summary["worker_deaths"] = sup.died
    summary["elapsed_s"] = round(max(summary["elapsed_s"], time.monotonic() - started), 3)
    summary["rate_per_s"] = round(summary.get("inserted", 0) / summary["elapsed_s"], 1) if summary["elapsed_s"] else 0.0
    return summary
