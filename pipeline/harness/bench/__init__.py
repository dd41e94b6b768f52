"""``python -m pipeline bench``: the pipeline's throughput next to its ceilings, in one run.

Measured side by side, each phase in a fresh process so its CPU time and peak RSS are its own:

* (a) ``broker``: receive + delete, no processing, with the pipeline's client and concurrency
  (``sqs.receivers`` pollers, ``sqs.ackers`` concurrent deletes): what the broker allows;
* (b) ``pipeline``: the whole pipeline draining the same backlog, first commit to last;
* (c) ``core``: the same bodies from memory through Transformer and CopySink, next to
  ``raw_copy``, a COPY-with-upsert of pre-built rows (what the database allows);
* (d) ``batched``: the pipeline draining messages of ``--events-per-message`` events (100), in
  events/s: how far batching producers get past the broker's per-message ceiling;
* ``latency``: the pipeline while ``loadgen`` sends at half of (b)'s rate: SentTimestamp to commit;
* ``--memory``: RSS while a 100,000-message backlog is drained (bounded by ``max_in_flight``).

Throughput is counted between the first and the last event (commit, or delete for (a)), so
process start-up and the final idle poll do not count. (a), (b), (d) and (c) take turns
``--rounds`` times (default 3) and their medians are compared. Only ratios measured in the same run mean
anything: absolute rates move with whatever else the machine is doing.

With the embedded default, SQS is a LocalStack started for the run (installed once into
``.cache/localstack-venv``): the embedded moto broker is far too slow to load. Configured
endpoints are used as they are, with queues and tables of the benchmark's own, removed after.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import orjson

from ...sample import sample_bodies
from ...settings import Settings
from ...console import progress_bar
from ..loadgen import loadgen
from ..shapes import Packing, Shape
from ..proxy import latency_proxy
from .chart import chart
from .options import MEMORY_COUNT, BenchOptions
from .phases import Child, run_pipeline_phase
from .report import best, report, table
from .report import table as report_table  # ``table`` is also the ``bench --table`` submodule's name
from .table import add_table_arguments, table_command
from .targets import drop_table, targets

__all__ = ["bench", "BenchOptions", "add_arguments", "command", "table"]


async def bench(settings: Settings, opts: BenchOptions) -> dict:
    """Run every phase; write ``<name>.json`` and ``<name>.png`` under ``opts.out``; return the report."""
    load0 = os.getloadavg()
    started = datetime.now(timezone.utc)
    async with targets(settings, opts) as (cfg, info), latency_proxy(cfg.sqs.endpoint_url, opts.rtt_ms) as via:
        s = cfg.sqs
        if "max_count" in info:
            cap = info["max_count"]
            opts = dataclasses.replace(opts, count=min(opts.count, cap), memory_count=min(opts.memory_count, cap),
                                       latency_seconds=min(opts.latency_seconds, 5), ceiling_concurrencies=(8,))
        # The phases reach SQS through the latency proxy; filling the queues does not need to wait for it.
        far = cfg.model_copy(update={"sqs": s.model_copy(update={"endpoint_url": via})})
        phases: dict[str, list[dict]] = {}
        if opts.memory:
            await _fill(cfg, s.queue_url, opts.memory_count, opts, "the queue")
            phases["memory"] = [await run_pipeline_phase(far, opts.memory_count)]
        else:
            broker_q = info["queues"]["broker"]
            broker_cfg = far.model_copy(update={"sqs": far.sqs.model_copy(update={"queue_url": broker_q})})
            search = opts.search_count or max(100, opts.count // 2)
            for c in opts.ceiling_concurrencies if len(opts.ceiling_concurrencies) > 1 else ():
                await _fill(cfg, broker_q, search, opts, f"(a) bare loop search, {c} pollers")
                r = await Child("_phase_broker", broker_cfg, search, c, c).result()
                await _settle(far)
                phases.setdefault("ceiling_search", []).append({**r, "pollers": c})
            best_c = (max(phases["ceiling_search"], key=lambda r: r["rate_per_s"])["pollers"]
                      if "ceiling_search" in phases else opts.ceiling_concurrencies[0])
            info["ceiling_pollers"] = best_c
            for _ in range(opts.rounds):
                await _fill(cfg, broker_q, opts.count, opts, f"(a) bare loop, {best_c} pollers")
                phases.setdefault("broker", []).append(await Child("_phase_broker", broker_cfg, opts.count,
                                                                    best_c, best_c).result())
                await _settle(far)
                await _fill(cfg, s.queue_url, opts.count, opts, "(b) pipeline")
                phases.setdefault("pipeline", []).append(await run_pipeline_phase(far, opts.count))
                await drop_table(cfg.postgres.dsn.get_secret_value(), cfg.postgres.table)
                # (d) and (c) every round too: their ratio compares medians measured under the same load.
                if opts.events_per_message > 1:  # batched messages: events/s, next to (b) and to raw COPY
                    n_msgs = max(20, opts.count * opts.batched_factor // opts.events_per_message)
                    packing = Packing(events_per_message=opts.events_per_message, shape=Shape(gzip=opts.batch_gzip))
                    # The bare loop on the same messages: what the broker allows in events/s for this shape.
                    await _fill(cfg, broker_q, n_msgs, opts, f"(a) bare loop, batches of {opts.events_per_message}",
                                packing=packing)
                    bare = await Child("_phase_broker", broker_cfg, n_msgs, best_c, best_c).result()
                    await _settle(far)
                    await _fill(cfg, s.queue_url, n_msgs, opts, f"(d) batches of {opts.events_per_message} events",
                                packing=packing)
                    d = await run_pipeline_phase(far, n_msgs)
                    d["bare_loop_events_per_s"] = round(bare["rate_per_s"] * opts.events_per_message, 1)
                    phases.setdefault("batched", []).append(d)
                    await drop_table(cfg.postgres.dsn.get_secret_value(), cfg.postgres.table)
                core = await Child("_phase_core", cfg, sample_bodies(opts.count, opts.seed)).result()
                phases.setdefault("core", []).append(core["core"])
                phases.setdefault("raw_copy", []).append(core["raw_copy"])
                phases.setdefault("raw_direct_copy", []).append(core["raw_direct_copy"])
                await drop_table(cfg.postgres.dsn.get_secret_value(), cfg.postgres.table)
            if opts.latency:
                phases["latency"] = [await _latency_run(far, best(phases["pipeline"])["rate_per_s"] / 2, opts)]
    result = report(settings, cfg, info, opts, phases, load0, started)
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"{opts.name}.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    result["files"] = {"json": str(path)}
    png = chart(result, phases, opts.out / f"{opts.name}.png")
    if png:
        result["files"]["png"] = str(png)
    return result


async def _latency_run(cfg: Settings, rate: float, opts: BenchOptions) -> dict:
    """The pipeline consuming while ``loadgen`` sends at ``rate``: SentTimestamp → commit."""
    count = max(100, min(int(rate * opts.latency_seconds), 10 * opts.count))
    sent: dict = {}

    async def send() -> None:
        sent.update(await loadgen(cfg, count=count, rate=rate, seed=opts.seed + 1))

    result = await run_pipeline_phase(cfg, count, on_ready=send)
    result["target_rate_per_s"] = round(rate, 1)
    result["sent_rate_per_s"] = sent.get("rate_per_s")
    return result


async def _settle(cfg: Settings) -> None:
    """Let the long polls of a cancelled bare-loop phase run out before the queue is filled again.

    The server finishes a long poll whose client went away (behind the proxy it cannot even tell),
    and the messages it takes from the next fill stay invisible for the visibility timeout: the
    next run would stall for 30 s on them.
    """
    await asyncio.sleep(cfg.sqs.wait_time_seconds + 1)


async def _fill(settings: Settings, queue_url: str, count: int, opts: BenchOptions, what: str,
                packing: Packing = Packing()) -> dict:
    with progress_bar(count, f"filling {what}") as on_sent:
        return await loadgen(settings, count=count, seed=opts.seed, queue_url=queue_url, on_sent=on_sent,
                             packing=packing)


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
    p.add_argument("--events-per-message", type=int, default=100, metavar="N",
                   help="(d): the pipeline draining messages of N events (JSON arrays), 10 x --count events, "
                        "reported in events/s; 1 skips it (default: %(default)s)")
    p.add_argument("--batch-gzip", action="store_true", help="(d)'s messages gzipped and base64-encoded")
    p.add_argument("--rtt-ms", type=float, default=0.0,
                   help="add this round trip to every SQS call of the phases, through a latency-injecting TCP proxy "
                        "(real SQS: 10-20 ms in a region, 50+ across regions; default: %(default)s)")
    p.add_argument("--ceiling", default="8,16,32,64,128",
                   help="pollers (= deleters) the bare receive+delete loop is tried at; the best is the ceiling "
                        "(default: %(default)s)")
    add_table_arguments(p)


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """``python -m pipeline bench``: the table on stdout, then one JSON line (ratios, targets met, files)."""
    if args.table:
        return await table_command(settings, args)
    if args.count is not None and args.count < 100:
        print("error: --count must be >= 100", file=sys.stderr)
        return 2
    if args.rtt_ms < 0 or args.rtt_ms > 5000:
        print("error: --rtt-ms must be between 0 and 5000", file=sys.stderr)
        return 2
    try:
        ceiling = tuple(int(c) for c in args.ceiling.split(",") if c.strip())
    except ValueError:
        ceiling = ()
    if not ceiling or min(ceiling) < 1 or max(ceiling) > 512:
        print("error: --ceiling must be comma-separated numbers from 1 to 512, like 8,16,32", file=sys.stderr)
        return 2
    args.ceiling = ceiling
    result = await bench(settings, options(args))
    print(report_table(result))
    sys.stdout.write(orjson.dumps({"ratios": result["ratios"], "met": result["met"], "files": result["files"]}).decode() + "\n")
    return 0


def options(args: argparse.Namespace) -> BenchOptions:
    count = args.count or (MEMORY_COUNT if args.memory else 20_000)
    return BenchOptions(count=count, memory_count=count, out=args.out, memory=args.memory, latency=args.latency,
                        rounds=max(1, args.rounds), seed=args.seed, latency_seconds=args.latency_seconds,
                        name=("memory" if args.memory else "bench") + (f"-rtt{args.rtt_ms:g}ms" if args.rtt_ms else ""),
                        rtt_ms=args.rtt_ms, ceiling_concurrencies=args.ceiling,
                        events_per_message=max(1, args.events_per_message), batch_gzip=args.batch_gzip)
