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
import dataclasses
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import orjson

from ...settings import Settings
from ...console import progress_bar
from ..loadgen import loadgen
from .chart import chart
from .options import MEMORY_COUNT, BenchOptions
from .phases import Child, run_pipeline_phase
from .report import best, report, table
from .targets import drop_table, targets

__all__ = ["bench", "BenchOptions", "add_arguments", "command", "table"]


async def bench(settings: Settings, opts: BenchOptions) -> dict:
    """Run every phase; write ``<name>.json`` and ``<name>.png`` under ``opts.out``; return the report."""
    load0 = os.getloadavg()
    started = datetime.now(timezone.utc)
    async with targets(settings, opts) as (cfg, info):
        s = cfg.sqs
        if "max_count" in info:
            cap = info["max_count"]
            opts = dataclasses.replace(opts, count=min(opts.count, cap), memory_count=min(opts.memory_count, cap),
                                       latency_seconds=min(opts.latency_seconds, 5))
        phases: dict[str, list[dict]] = {}
        if opts.memory:
            await _fill(cfg, s.queue_url, opts.memory_count, opts, "the queue")
            phases["memory"] = [await run_pipeline_phase(cfg, opts.memory_count)]
        else:
            broker_cfg = cfg.model_copy(update={"sqs": s.model_copy(update={"queue_url": info["queues"]["broker"]})})
            for _ in range(opts.rounds):
                await _fill(cfg, info["queues"]["broker"], opts.count, opts, "(a) broker")
                phases.setdefault("broker", []).append(await Child("_phase_broker", broker_cfg, opts.count).result())
                await _fill(cfg, s.queue_url, opts.count, opts, "(b) pipeline")
                phases.setdefault("pipeline", []).append(await run_pipeline_phase(cfg, opts.count))
                await drop_table(cfg.postgres.dsn.get_secret_value(), cfg.postgres.table)
            from ...sample import sample_bodies

            core = await Child("_phase_core", cfg, sample_bodies(opts.count, opts.seed)).result()
            phases["core"], phases["raw_copy"] = [core["core"]], [core["raw_copy"]]
            await drop_table(cfg.postgres.dsn.get_secret_value(), cfg.postgres.table)
            if opts.latency:
                phases["latency"] = [await _latency_run(cfg, best(phases["pipeline"])["rate_per_s"] / 2, opts)]
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


async def _fill(settings: Settings, queue_url: str, count: int, opts: BenchOptions, what: str) -> dict:
    with progress_bar(count, f"filling {what}") as on_sent:
        return await loadgen(settings, count=count, seed=opts.seed, queue_url=queue_url, on_sent=on_sent)


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
    result = await bench(settings, options(args))
    print(table(result))
    sys.stdout.write(orjson.dumps({"ratios": result["ratios"], "met": result["met"], "files": result["files"]}).decode() + "\n")
    return 0


def options(args: argparse.Namespace) -> BenchOptions:
    count = args.count or (MEMORY_COUNT if args.memory else 20_000)
    return BenchOptions(count=count, memory_count=count, out=args.out, memory=args.memory, latency=args.latency,
                        rounds=max(1, args.rounds), seed=args.seed, latency_seconds=args.latency_seconds,
                        name="memory" if args.memory else "bench")
