"""``python -m pipeline bench``: the pipeline's throughput next to its ceilings, in one run.

Measured side by side, each phase in a fresh process so its CPU time and peak RSS are its own:

* (a) ``broker``: receive + delete, no processing, with the pipeline's client and concurrency
  (``sqs.receivers`` pollers, ``sqs.ackers`` concurrent deletes): what the broker allows;
* (b) ``pipeline``: the whole pipeline draining the same backlog, first commit to last;
* (c) ``core``: the same bodies from memory through Transformer and CopySink, next to
  ``raw_copy``, a COPY-with-upsert of pre-built rows (what the database allows);
* ``latency``: the pipeline while ``loadgen`` sends at half of (b)'s rate: SentTimestamp to commit;
* ``--memory``: RSS while a 100,000-message backlog is drained (bounded by ``max_in_flight``).

Throughput is counted between the first and the last event (commit, or delete for (a)), so
process start-up and the final idle poll do not count. (a) and (b) alternate ``--rounds``
times (default 3) and their medians are compared. Only ratios measured in the same run mean
anything: absolute rates move with whatever else the machine is doing.

With the embedded default, SQS is a LocalStack started for the run (installed once into
``.cache/localstack-venv``): the embedded moto broker is far too slow to load. Configured
endpoints are used as they are, with queues and tables of the benchmark's own, removed after.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import platform
import resource
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import orjson

from .loadgen import loadgen, producer_client, progress_bar
from .settings import Settings

__all__ = ["bench", "BenchOptions", "add_arguments", "command", "table"]

log = logging.getLogger("pipeline.bench")

TARGETS = {"pipeline_vs_broker": 0.9, "core_vs_raw_copy": 0.5, "latency_p99_ms": 1000.0}
MEMORY_COUNT = 100_000
MOTO_MAX_COUNT = 300  # the embedded moto broker slows down with every message it holds: keep a fallback run tiny


@dataclass
class BenchOptions:
    count: int = 20_000
    memory_count: int = MEMORY_COUNT
    out: Path = Path("benchmarks")
    memory: bool = False
    latency: bool = True
    rounds: int = 3
    seed: int = 42
    latency_seconds: float = 15.0
    cache_dir: Path = Path(".cache")
    name: str = "bench"


# ---------------------------------------------------------------------------------------
# Measuring a phase: CPU time, RSS samples and events, in the process that does the work.


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Meter:
    """Events ``(t, n)`` of one phase, its CPU time and sampled RSS (plus the counter over time)."""

    counter: Callable[[], int] = lambda: 0
    events: list[tuple[float, int]] = field(default_factory=list)
    latencies_ms: array.array = field(default_factory=lambda: array.array("d"))
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, counter)
    t0: float = 0.0
    work: float | None = None  # when the first message was in hand (the fallback window's start)
    cpu0: float = 0.0
    cpu1: float = 0.0
    _task: asyncio.Task | None = None

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = _cpu_seconds()
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.rss.append((time.monotonic() - self.t0, _rss_bytes(), self.counter()))
            await asyncio.sleep(0.1)

    def event(self, n: int) -> None:
        self.events.append((time.monotonic() - self.t0, n))

    def working(self) -> None:
        if self.work is None:
            self.work = time.monotonic() - self.t0

    def observe(self, msgs: list[dict]) -> None:
        """``CopySink.observe_latency`` hook: called once per committed batch."""
        self.events.append((time.monotonic() - self.t0, len(msgs)))
        now_ms = time.time() * 1000
        add = self.latencies_ms.append
        for m in msgs:
            add(now_ms - int(m["Attributes"]["SentTimestamp"]))

    async def stop(self) -> dict:
        self.cpu1 = _cpu_seconds()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.rss.append((time.monotonic() - self.t0, _rss_bytes(), self.counter()))
        return self.result()

    def result(self) -> dict:
        ev = self.events
        n, window, rate = _rate(ev, self.work)
        cpu = self.cpu1 - self.cpu0
        return {
            "t0": self.t0,
            "work": self.work,
            "messages": n,
            "seconds": round(window, 3),
            "rate_per_s": round(rate, 1),
            "cpu_s": round(cpu, 3),
            "cpu_s_per_10k": round(cpu / n * 10_000, 3) if n else None,
            "peak_rss_mb": round(max((r for _, r, _ in self.rss), default=_rss_bytes()) / 2**20, 1),
            "latency_ms": _percentiles(self.latencies_ms),
            "events": [(round(t, 3), k) for t, k in ev],
            "rss": [(round(t, 2), round(r / 2**20, 1), c) for t, r, c in self.rss],
            "latencies_ms": self.latencies_ms.tolist(),
        }


def _rate(ev: list[tuple[float, int]], work: float | None) -> tuple[int, float, float]:
    """Messages, window and rate: first event to last, so start-up and the last idle poll do not count.

    With fewer than three events (small runs, one or two batches) the window starts when the
    first message was in hand instead.
    """
    n = sum(k for _, k in ev)
    if len(ev) >= 3:
        window = ev[-1][0] - ev[0][0]
        return n, window, (n - ev[0][1]) / window if window > 0 else 0.0
    if ev and work is not None:
        window = ev[-1][0] - work
        return n, window, n / window if window > 0 else 0.0
    return n, 0.0, 0.0


def _percentiles(values: array.array | list[float]) -> dict | None:
    if not values:
        return None
    s = sorted(values)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))], 1)

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "max": round(s[-1], 1), "n": len(s)}


# ---------------------------------------------------------------------------------------
# The phases. Each runs in a child process (``_in_child``) and returns ``Meter.result()``.


async def _phase_broker(settings: Settings, expected: int) -> dict:
    """(a) receive + delete, nothing in between: the pipeline's shape without its work.

    ``receivers`` pollers hand receive batches to ``ackers`` deleters through a queue capped
    like the pipeline's in-flight messages, so polling never waits for a delete, as in the
    pipeline; the same client, the same request, the same concurrency.
    """
    from .runner import sqs_client

    s = settings.sqs
    meter = Meter()
    done = 0
    request: dict[str, Any] = {
        "QueueUrl": s.queue_url, "MaxNumberOfMessages": 10, "WaitTimeSeconds": s.wait_time_seconds,
        "MessageSystemAttributeNames": ["SentTimestamp", "ApproximateReceiveCount"],
    }
    if s.visibility_timeout:
        request["VisibilityTimeout"] = s.visibility_timeout
    finished = asyncio.Event()
    received: asyncio.Queue = asyncio.Queue(max(1, s.max_in_flight // 10))
    async with sqs_client(settings) as client:

        async def poll() -> None:
            while True:
                msgs = (await client.receive_message(**request)).get("Messages")
                if msgs:
                    meter.working()
                    await received.put(msgs)

        async def delete() -> None:
            nonlocal done
            while True:
                msgs = await received.get()
                await client.delete_message_batch(QueueUrl=s.queue_url, Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])
                done += len(msgs)
                meter.event(len(msgs))
                if done >= expected:
                    finished.set()

        meter.counter = lambda: done
        meter.start()
        workers = [asyncio.create_task(poll()) for _ in range(s.receivers)]
        workers += [asyncio.create_task(delete()) for _ in range(s.ackers)]
        await _until(finished, workers, timeout=_deadline(expected))
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        return await meter.stop()


async def _phase_pipeline(settings: Settings, expected: int, ready: Any = None, shared: Any = None) -> dict:
    """(b) the pipeline itself, stopped once ``expected`` messages are acked (by all workers)."""
    from .runner import Runtime, run

    rt = Runtime(settings)
    meter = Meter(counter=lambda: rt.stats.acked)
    stop = asyncio.Event()

    async def watch() -> None:
        pushed = 0
        while True:
            await asyncio.sleep(0.05)
            if ready is not None and rt.running:
                ready.set()
            if rt.stats.received:
                meter.working()
            acked = rt.stats.acked
            if shared is not None:
                with shared.get_lock():
                    shared.value += acked - pushed
                    total = shared.value
                pushed = acked
            else:
                total = acked
            if total >= expected:
                stop.set()
                return

    meter.start()
    watcher = asyncio.create_task(watch())
    try:
        summary = await asyncio.wait_for(run(settings, stop=stop, runtime=rt, observe_latency=meter.observe),
                                         _deadline(expected))
    finally:
        watcher.cancel()
    result = await meter.stop()
    result["summary"] = summary
    return result


async def _phase_core(settings: Settings, bodies: list[str]) -> dict:
    """(c) in-memory bodies → Transformer → CopySink, next to a raw COPY-with-upsert of the rows."""
    import asyncpg

    from stages.masking import Masker, parse_key
    from stages.sink import STAGE_TABLE, CopySink, create_stage_table
    from stages.transform import COLUMNS, Transformer, to_row

    from .metrics import Stats
    from .schema import migrate

    p = settings.pipeline
    table = settings.postgres.table
    masker = Masker([parse_key(settings.masking.key.get_secret_value())])
    sent = str(int(time.time() * 1000))
    msgs = [{"MessageId": f"m-{i}", "ReceiptHandle": f"h-{i}", "Body": b,
             "Attributes": {"SentTimestamp": sent, "ApproximateReceiveCount": "1"}} for i, b in enumerate(bodies)]
    batches = [msgs[i : i + 10] for i in range(0, len(msgs), 10)]
    dsn = settings.postgres.dsn.get_secret_value()
    conn = await asyncpg.connect(dsn)
    await migrate(conn, table)
    await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=settings.postgres.pool_size,
                                     init=lambda c: create_stage_table(c, table))
    results: dict[str, Any] = {}
    try:
        # Raw COPY-with-upsert: rows built beforehand, the same statements CopySink runs.
        rows = [to_row(m["Body"], m["MessageId"], int(sent), masker) for m in msgs]
        cols = ", ".join(COLUMNS)
        insert = f"INSERT INTO {table} ({cols}) SELECT {cols} FROM pg_temp.{STAGE_TABLE} ON CONFLICT (message_id) DO NOTHING"
        await pool.execute(f"TRUNCATE {table}")
        meter = Meter()
        meter.start()
        meter.working()
        async with pool.acquire() as c:
            for i in range(0, len(rows), p.batch_size):
                chunk = rows[i : i + p.batch_size]
                async with c.transaction():
                    await c.copy_records_to_table(STAGE_TABLE, records=chunk, columns=COLUMNS, schema_name="pg_temp")
                    await c.execute(insert)
                meter.event(len(chunk))
        results["raw_copy"] = await meter.stop()
        del rows

        await pool.execute(f"TRUNCATE {table}")
        stats = Stats()
        raw: asyncio.Queue = asyncio.Queue(p.queue_size)
        out: asyncio.Queue = asyncio.Queue(p.queue_size)
        acks: asyncio.Queue = asyncio.Queue(p.queue_size * 4)
        meter = Meter(counter=lambda: stats.inserted)
        transformer = Transformer(raw, out, acks, masker, stats, settings.sqs.max_receive_count)
        sink = CopySink(pool, table, out, acks, stats, batch_size=p.batch_size, batch_timeout=p.batch_timeout,
                        observe_latency=lambda m: meter.event(len(m)))

        async def feed() -> None:
            meter.working()
            for b in batches:
                await raw.put(b)
            await raw.put(None)

        async def drain_acks() -> None:
            while await acks.get() is not None:
                pass

        meter.start()
        await asyncio.gather(feed(), transformer.run(), sink.run(), drain_acks())
        results["core"] = await meter.stop()
        results["core"]["inserted"] = stats.inserted
    finally:
        await pool.close()
    return results


def _deadline(n: int) -> float:
    return 120 + n / 100  # a stuck phase fails instead of hanging the benchmark


async def _until(event: asyncio.Event, tasks: list[asyncio.Task], timeout: float) -> None:
    waiter = asyncio.create_task(event.wait())
    done, _ = await asyncio.wait([waiter, *tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for t in done:
        if t is not waiter and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    if not done:
        raise TimeoutError(f"phase did not finish within {timeout:.0f} s")


def _child_main(conn: Any, fn_name: str, args: tuple) -> None:
    """Entry point of a phase process: run the phase, send back its result (or its error)."""
    from .logs import setup_logging

    setup_logging("WARNING")
    fn = globals()[fn_name]
    try:
        try:
            import uvloop

            result = uvloop.run(fn(*args))
        except ImportError:  # pragma: no cover
            result = asyncio.run(fn(*args))
        conn.send(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


_MP = multiprocessing.get_context("spawn")


class _Child:
    """One phase process (spawned: nothing of the parent's event loop or clients leaks in)."""

    def __init__(self, fn_name: str, *args: Any) -> None:
        self._recv, send = _MP.Pipe(duplex=False)
        self.proc = _MP.Process(target=_child_main, args=(send, fn_name, args), daemon=True)
        self.proc.start()
        send.close()

    async def result(self) -> dict:
        def wait() -> tuple[str, Any]:
            try:
                return self._recv.recv()
            except EOFError:
                return "error", f"phase process died (exit code {self.proc.exitcode})"
            finally:
                self.proc.join(10)

        status, value = await asyncio.to_thread(wait)
        if status != "ok":
            raise RuntimeError(f"benchmark phase failed: {value}")
        return value


async def _run_pipeline_phase(settings: Settings, expected: int, on_ready: Callable[[], Any] | None = None) -> dict:
    """(b) with ``pipeline.processes`` workers; their events and latencies are merged."""
    n = settings.pipeline.processes
    shared = _MP.Value("q", 0)
    ready = _MP.Event()
    kids = [_Child("_phase_pipeline", settings, expected, ready, shared) for _ in range(n)]
    if on_ready is not None:
        await asyncio.to_thread(ready.wait, 120)
        await on_ready()
    results = [await k.result() for k in kids]
    if n == 1:
        return results[0]
    return _merge(results)


def _merge(results: list[dict]) -> dict:
    """Workers' results as one, their events on one clock (``time.monotonic`` is system-wide)."""
    base = min(r["t0"] for r in results)
    events = sorted((round(t + r["t0"] - base, 3), k) for r in results for t, k in r["events"])
    works = [r["work"] + r["t0"] - base for r in results if r["work"] is not None]
    lat = [x for r in results for x in r["latencies_ms"]]
    n, window, rate = _rate(events, min(works) if works else None)
    cpu = sum(r["cpu_s"] for r in results)
    return {
        "t0": base, "work": min(works) if works else None,
        "messages": n, "seconds": round(window, 3), "rate_per_s": round(rate, 1),
        "cpu_s": round(cpu, 3), "cpu_s_per_10k": round(cpu / n * 10_000, 3) if n else None,
        "peak_rss_mb": round(sum(r["peak_rss_mb"] for r in results), 1),
        "latency_ms": _percentiles(lat), "events": events, "rss": results[0]["rss"], "latencies_ms": lat,
        "workers": [{k: r[k] for k in ("messages", "rate_per_s", "cpu_s", "peak_rss_mb")} for r in results],
    }


# ---------------------------------------------------------------------------------------
# Where to run: LocalStack (or configured endpoints), a PostgreSQL, queues and tables of our own.


@contextlib.asynccontextmanager
async def _targets(settings: Settings, opts: BenchOptions) -> AsyncIterator[tuple[Settings, dict]]:
    """Settings that point the benchmark at its own queues and table; torn down afterwards."""
    from pydantic import SecretStr

    from stages.masking import generate_key

    from botocore.exceptions import BotoCoreError, ClientError

    from .embedded import CREDENTIALS, _start_postgres
    from .runner import _sqs_problem

    info: dict[str, Any] = {}
    stack = contextlib.ExitStack()
    with stack:
        endpoint = settings.sqs.endpoint_url
        if not (settings.sqs.endpoint_url or settings.sqs.queue_url):
            for k, v in CREDENTIALS.items():
                os.environ.setdefault(k, v)
            try:
                endpoint, info["broker"] = await asyncio.to_thread(_start_localstack, opts.cache_dir, stack)
            except RuntimeError as exc:  # no LocalStack (offline, no venv): the embedded broker, small
                log.warning("LocalStack unavailable, falling back to the embedded moto broker (slow: counts capped)",
                            extra={"error": str(exc).splitlines()[0]})
                endpoint = await asyncio.to_thread(_start_moto, settings.pipeline.state_dir, stack)
                info["broker"] = "moto (embedded fallback; LocalStack unavailable)"
                info["max_count"] = MOTO_MAX_COUNT
        else:
            info["broker"] = f"configured endpoint {endpoint or 'AWS'}"
        if settings.embedded_postgres:
            settings.pipeline.state_dir.mkdir(parents=True, exist_ok=True)
            dsn = await asyncio.to_thread(_start_postgres, settings.pipeline.state_dir)
        else:
            dsn = settings.postgres.dsn.get_secret_value()
        tag = f"bench-{secrets.token_hex(4)}"
        table = "bench_" + tag.split("-")[1]
        info["postgres_version"] = await _pg_version(settings, dsn)
        sqs = settings.sqs.model_copy(update={"endpoint_url": endpoint})
        async with producer_client(settings.model_copy(update={"sqs": sqs}), 4) as c:
            urls: dict[str, str] = {}
            try:
                try:
                    for name in ("broker", "pipeline", "dlq"):
                        urls[name] = (await c.create_queue(QueueName=f"{tag}-{name}"))["QueueUrl"]
                except (BotoCoreError, ClientError) as exc:
                    raise _sqs_problem(exc, "creating benchmark queue", f"{tag}-…", endpoint) from None
                info["queues"] = urls
                yield settings.model_copy(update={
                    "sqs": sqs.model_copy(update={  # a short long-poll: no 10 s idle tail per phase
                        "queue_url": urls["pipeline"], "dlq_url": urls["dlq"],
                        "wait_time_seconds": min(settings.sqs.wait_time_seconds, 1)}),
                    "postgres": settings.postgres.model_copy(update={"dsn": SecretStr(dsn), "table": table}),
                    # A throwaway key, and no HTTP server: the benchmark must not touch a live deployment's.
                    "masking": type(settings.masking)(key=SecretStr(generate_key("bench").encode())),
                    "http": settings.http.model_copy(update={"port": None}),
                }), info
            finally:
                for url in urls.values():
                    with contextlib.suppress(Exception):
                        await c.delete_queue(QueueUrl=url)
                with contextlib.suppress(Exception):
                    await _drop_table(dsn, table)


def _start_localstack(cache_dir: Path, stack: contextlib.ExitStack) -> tuple[str, str]:
    from .localstack import LocalStack, installed

    if not installed(cache_dir.resolve() / "localstack-venv"):
        print(f"installing LocalStack 4.12 into {cache_dir / 'localstack-venv'} (once, ~1 min)…", file=sys.stderr)
    ls = LocalStack.start(cache_dir)
    stack.callback(ls.stop)
    return ls.endpoint, "LocalStack 4.12 (host mode, started for the benchmark)"


def _start_moto(state_dir: Path, stack: contextlib.ExitStack) -> str:
    from .embedded import _start_broker

    state_dir.mkdir(parents=True, exist_ok=True)
    proc, endpoint = _start_broker(state_dir)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except Exception:  # noqa: BLE001
            proc.kill()

    stack.callback(stop)
    return endpoint


async def _pg_version(settings: Settings, dsn: str) -> str:
    from pydantic import SecretStr

    from .runner import connect_postgres  # one-line errors for an unreachable or refusing server

    conn = await connect_postgres(settings.model_copy(update={
        "postgres": settings.postgres.model_copy(update={"dsn": SecretStr(dsn)})}))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def _drop_table(dsn: str, table: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await conn.close()


async def _fill(settings: Settings, queue_url: str, count: int, opts: BenchOptions, what: str) -> dict:
    with progress_bar(count, f"filling {what}") as on_sent:
        return await loadgen(settings, count=count, seed=opts.seed, queue_url=queue_url, on_sent=on_sent)


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("events", "rss", "latencies_ms", "t0", "work")}


# ---------------------------------------------------------------------------------------
# The command.


async def bench(settings: Settings, opts: BenchOptions) -> dict:
    """Run every phase; write ``<name>.json`` and ``<name>.png`` under ``opts.out``; return the report."""
    load0 = os.getloadavg()
    started = datetime.now(timezone.utc)
    async with _targets(settings, opts) as (cfg, info):
        s = cfg.sqs
        if "max_count" in info:
            cap = info["max_count"]
            opts = dataclasses.replace(opts, count=min(opts.count, cap), memory_count=min(opts.memory_count, cap),
                                       latency_seconds=min(opts.latency_seconds, 5))
        phases: dict[str, list[dict]] = {}
        if opts.memory:
            await _fill(cfg, s.queue_url, opts.memory_count, opts, "the queue")
            phases["memory"] = [await _run_pipeline_phase(cfg, opts.memory_count)]
        else:
            broker_cfg = cfg.model_copy(update={"sqs": s.model_copy(update={"queue_url": info["queues"]["broker"]})})
            for _ in range(opts.rounds):
                await _fill(cfg, info["queues"]["broker"], opts.count, opts, "(a) broker")
                phases.setdefault("broker", []).append(await _Child("_phase_broker", broker_cfg, opts.count).result())
                await _fill(cfg, s.queue_url, opts.count, opts, "(b) pipeline")
                phases.setdefault("pipeline", []).append(await _run_pipeline_phase(cfg, opts.count))
                await _drop_table(cfg.postgres.dsn.get_secret_value(), cfg.postgres.table)
            from .sample import sample_bodies

            core = await _Child("_phase_core", cfg, sample_bodies(opts.count, opts.seed)).result()
            phases["core"], phases["raw_copy"] = [core["core"]], [core["raw_copy"]]
            await _drop_table(cfg.postgres.dsn.get_secret_value(), cfg.postgres.table)
            if opts.latency:
                phases["latency"] = [await _latency_run(cfg, _best(phases["pipeline"])["rate_per_s"] / 2, opts)]
    report = _report(settings, cfg, info, opts, phases, load0, started)
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"{opts.name}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    report["files"] = {"json": str(path)}
    chart = _chart(report, phases, opts.out / f"{opts.name}.png")
    if chart:
        report["files"]["png"] = str(chart)
    return report


async def _latency_run(cfg: Settings, rate: float, opts: BenchOptions) -> dict:
    """The pipeline consuming while ``loadgen`` sends at ``rate``: SentTimestamp → commit."""
    count = max(100, min(int(rate * opts.latency_seconds), 10 * opts.count))
    sent: dict = {}

    async def send() -> None:
        sent.update(await loadgen(cfg, count=count, rate=rate, seed=opts.seed + 1))

    result = await _run_pipeline_phase(cfg, count, on_ready=send)
    result["target_rate_per_s"] = round(rate, 1)
    result["sent_rate_per_s"] = sent.get("rate_per_s")
    return result


def _best(runs: list[dict]) -> dict:
    """Of several rounds, the median by rate (the one a re-run is most likely to reproduce)."""
    return sorted(runs, key=lambda r: r["rate_per_s"])[len(runs) // 2]


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _report(settings: Settings, cfg: Settings, info: dict, opts: BenchOptions, phases: dict[str, list[dict]],
            load0: tuple[float, float, float], started: datetime) -> dict:
    picked = {name: _best(runs) for name, runs in phases.items()}
    ratios: dict[str, Any] = {}
    met: dict[str, bool] = {}
    if "broker" in picked:
        ratios["pipeline_vs_broker"] = _ratio(picked["pipeline"]["rate_per_s"], picked["broker"]["rate_per_s"])
        if opts.rounds > 1:
            ratios["pipeline_vs_broker_by_round"] = [
                _ratio(p["rate_per_s"], b["rate_per_s"]) for p, b in zip(phases["pipeline"], phases["broker"])]
        ratios["core_vs_raw_copy"] = _ratio(picked["core"]["rate_per_s"], picked["raw_copy"]["rate_per_s"])
        met["pipeline_vs_broker"] = (ratios["pipeline_vs_broker"] or 0) >= TARGETS["pipeline_vs_broker"]
        met["core_vs_raw_copy"] = (ratios["core_vs_raw_copy"] or 0) >= TARGETS["core_vs_raw_copy"]
    if "latency" in picked and picked["latency"]["latency_ms"]:
        met["latency_p99_ms"] = picked["latency"]["latency_ms"]["p99"] <= TARGETS["latency_p99_ms"]
    if "memory" in picked:
        ratios["memory"] = m = _memory_summary(picked["memory"])
        met["memory_flat"] = m["growth_mb"] <= max(10.0, 0.1 * m["rss_mb_at_10pct"])
    s, p, pg = cfg.sqs, cfg.pipeline, cfg.postgres
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover
        loop = "asyncio"
    return {
        "started": started.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "broker": info["broker"],
            "postgres": f"PostgreSQL {info['postgres_version']}",
        },
        "config": {
            "count": opts.memory_count if opts.memory else opts.count, "rounds": opts.rounds,
            "receivers": s.receivers, "ackers": s.ackers, "max_in_flight": s.max_in_flight,
            "wait_time_seconds": s.wait_time_seconds, "batch_size": p.batch_size,
            "batch_timeout": p.batch_timeout, "queue_size": p.queue_size, "pool_size": pg.pool_size,
            "processes": p.processes, "event_loop": loop,
        },
        "targets": TARGETS,
        "ratios": ratios,
        "met": met,
        "phases": {name: _strip(r) for name, r in picked.items()},
        "rounds": {name: [_strip(r) for r in runs] for name, runs in phases.items() if len(runs) > 1},
        "series": {name: {"throughput": _throughput(r), "rss_mb": [(t, m) for t, m, _ in r["rss"]]}
                   for name, r in picked.items()},
    }


def _memory_summary(r: dict) -> dict:
    """RSS while the backlog drains: after the first 10 % of messages, at its peak, at the end."""
    total = r["messages"] or 1
    rss = r["rss"]
    warm = next((m for _, m, c in rss if c >= total * 0.1), rss[0][1])
    peak = max(m for _, m, c in rss if c >= total * 0.1) if any(c >= total * 0.1 for _, _, c in rss) else warm
    return {"rss_mb_at_10pct": warm, "rss_mb_peak_after_10pct": peak, "rss_mb_end": rss[-1][1],
            "growth_mb": round(peak - warm, 1), "messages": r["messages"]}


def _throughput(r: dict, window: float = 1.0) -> list[tuple[float, float]]:
    """Messages/s over time: from the acked counter (sampled every 0.1 s) over a sliding
    ``window``, since deletes flow evenly while commits come in bursts; phases too short for
    that (the in-memory ones) fall back to their commit events in buckets."""
    samples = [(t, c) for t, _, c in r["rss"]]
    start = next((i for i, (_, c) in enumerate(samples) if c), None)
    if start is None or samples[-1][0] - samples[start][0] < 4 * window:
        return _buckets(r["events"])
    samples = samples[max(0, start - 1):]
    t0, out, j = samples[0][0], [], 0
    for t, c in samples[1:]:
        while samples[j + 1][0] <= t - window:
            j += 1
        tj, cj = samples[j]
        if t > tj:
            out.append((round(t - t0, 2), round((c - cj) / (t - tj), 1)))
    return out


def _buckets(events: list) -> list[tuple[float, float]]:
    """Events as (time, msg/s) in about 10 buckets, from the phase's first event."""
    if not events:
        return []
    t0 = events[0][0]
    width = max(0.01, (events[-1][0] - t0) / 10)
    counts: dict[int, int] = {}
    for t, n in events:
        k = int((t - t0) / width)
        counts[k] = counts.get(k, 0) + n
    last = max(counts)
    return [(round(k * width, 3), round(counts.get(k, 0) / width, 1)) for k in range(last + 1)]


def _chart(report: dict, phases: dict[str, list[dict]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no chart: matplotlib is missing (pip install -e '.[bench]')")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = {"broker": "(a) broker: receive+delete", "pipeline": "(b) pipeline end to end",
              "core": "(c) core, no SQS", "raw_copy": "raw COPY-with-upsert", "latency": "pipeline at half rate",
              "memory": "pipeline draining the backlog"}
    for name, series in report["series"].items():
        pts = series["throughput"]
        if pts:
            ax1.plot([t for t, _ in pts], [v for _, v in pts], label=labels.get(name, name),
                     marker="o" if len(pts) < 10 else None, markersize=3)
    ax1.set(title="Throughput over time (1 s window; in-memory phases: per batch)", xlabel="seconds since the phase's first message",
            ylabel="messages / s", yscale="log")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    if "memory" in phases:  # the memory check: RSS against messages done, not latency
        rss = _best(phases["memory"])["rss"]
        ax2.plot([c for _, _, c in rss], [m for _, m, _ in rss], label="RSS of the pipeline process")
        ax2.set(title=f"RSS while a {rss[-1][2]:,}-message backlog drains", xlabel="messages acked", ylabel="MB",
                ylim=(0, max(m for _, m, _ in rss) * 1.3))
    else:
        # (b) drains a backlog, so its latency is mostly time spent waiting in the queue: shown dashed.
        for name in ("latency", "pipeline"):
            lat = _best(phases[name])["latencies_ms"] if name in phases else []
            if lat:
                s = sorted(lat)
                ax2.plot(s, [i / len(s) for i in range(1, len(s) + 1)], label=labels[name],
                         linestyle="--" if name == "pipeline" else "-")
        ax2.set(title="End-to-end latency (SentTimestamp → commit), CDF", xlabel="ms", ylabel="share of messages",
                xscale="log")
        ax2.axvline(1000, color="grey", linestyle=":", linewidth=1)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    ratios = report["ratios"]
    if "pipeline_vs_broker" in ratios:
        fig.suptitle(f"pipeline / broker = {ratios['pipeline_vs_broker']}   core / raw COPY = {ratios['core_vs_raw_copy']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(report: dict) -> str:
    """The short table ``bench`` prints (and the README shows)."""
    rows = [("phase", "msg/s", "ratio", "p50 ms", "p95 ms", "p99 ms", "CPU s/10k", "peak RSS MB")]
    ph, ratios = report["phases"], report["ratios"]
    names = {"broker": "(a) broker ceiling: receive+delete", "pipeline": "(b) pipeline end to end",
             "raw_copy": "raw COPY-with-upsert (DB ceiling)", "core": "(c) core: transform + COPY sink",
             "latency": "pipeline at half rate (latency)", "memory": "pipeline draining the backlog"}
    ratio_of = {"pipeline": ratios.get("pipeline_vs_broker"), "core": ratios.get("core_vs_raw_copy")}
    for name in ("broker", "pipeline", "raw_copy", "core", "latency", "memory"):
        r = ph.get(name)
        if r is None:
            continue
        lat = r.get("latency_ms") or {}
        rate = r.get("sent_rate_per_s") if name == "latency" else r["rate_per_s"]
        rows.append((
            names[name], f"{rate:,.0f}" if rate else "-",
            f"{ratio_of[name]:.2f}" if ratio_of.get(name) is not None else "",
            *(f"{lat[k]:,.0f}" if lat else "-" for k in ("p50", "p95", "p99")),
            f"{r['cpu_s_per_10k']:.2f}" if r.get("cpu_s_per_10k") is not None else "-", f"{r['peak_rss_mb']:.0f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"
           for row in rows]
    out.insert(1, "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|")
    if "pipeline" in ph and ph["pipeline"].get("latency_ms"):
        out.append("(b) drains a backlog, so its latency is mostly the time messages waited in the queue; "
                   "the half-rate run is the end-to-end latency.")
    if "memory" in ratios:
        m = ratios["memory"]
        out.append(f"\nRSS while a {m['messages']:,}-message backlog drains: {m['rss_mb_at_10pct']} MB after 10 %, "
                   f"peak {m['rss_mb_peak_after_10pct']} MB, {m['rss_mb_end']} MB at the end (growth {m['growth_mb']} MB)")
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Measure the pipeline's throughput next to its ceilings on private queues and tables: "
                     "(a) the broker alone, (b) the pipeline, (c) the core without SQS, raw COPY, and latency at "
                     "half the maximum rate. Prints a table and one JSON line (ratios, targets met, files) and "
                     "writes bench.json and bench.png; the configured queue and table are never touched.")
    p.add_argument("--count", type=int, help=f"messages per phase (default: 20000; with --memory {MEMORY_COUNT})")
    p.add_argument("--out", type=Path, default=Path("benchmarks"),
                   help="folder for the JSON report and PNG chart (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternate (a) and (b) this many times and compare their medians (default: %(default)s)")
    p.add_argument("--memory", action="store_true",
                   help=f"instead: RSS while a {MEMORY_COUNT:,}-message backlog drains (writes memory.json/png)")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip the half-rate latency run")
    p.add_argument("--latency-seconds", type=float, default=15.0,
                   help="length of the half-rate latency run, seconds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seed of the generated bodies (default: %(default)s)")


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """``python -m pipeline bench``: the table on stdout, then one JSON line (ratios, targets met, files)."""
    if args.count is not None and args.count < 100:
        print("error: --count must be >= 100", file=sys.stderr)
        return 2
    report = await bench(settings, options(args))
    print(table(report))
    sys.stdout.write(orjson.dumps({"ratios": report["ratios"], "met": report["met"], "files": report["files"]}).decode() + "\n")
    return 0


def options(args: argparse.Namespace) -> BenchOptions:
    count = args.count or (MEMORY_COUNT if args.memory else 20_000)
    return BenchOptions(count=count, memory_count=count, out=args.out, memory=args.memory, latency=args.latency,
                        rounds=max(1, args.rounds), seed=args.seed, latency_seconds=args.latency_seconds,
                        name="memory" if args.memory else "bench")
