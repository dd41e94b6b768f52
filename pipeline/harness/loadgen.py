"""``python -m pipeline loadgen``: fill a queue with realistic login events, fast or at a set rate.

Many ``SendMessageBatch`` calls run at once (one aiobotocore client, a connection each),
because one call at a time is bounded by the broker's round trip, not by its throughput.
With ``rate`` the batches are scheduled on a fixed timetable (batch ``k`` leaves at
``k * 10 / rate`` seconds), so a slow call does not make the next ones bunch up.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from typing import Any, Callable, Iterator

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from stages import backoff
from stages.sqs import chunks

from ..clients import sqs_client
from ..console import progress_bar
from ..sample import iter_bodies
from ..settings import Settings

__all__ = ["loadgen", "producer_client", "add_arguments", "command"]

SEND_ATTEMPTS = 5


def producer_client(settings: Settings, concurrency: int) -> Any:
    """An SQS client sized for ``concurrency`` sends at once, without per-call validation."""
    return sqs_client(settings, concurrency=concurrency, read_timeout=30, parameter_validation=False)


def _batches(bodies: Iterator[tuple[str, str]]) -> Iterator[tuple[list[dict], Counter]]:
    """``SendMessageBatch`` entries and how many of each kind they hold, ten bodies at a time, lazily."""
    for batch in chunks(bodies):
        yield [{"Id": str(i), "MessageBody": body} for i, (_, body) in enumerate(batch)], Counter(k for k, _ in batch)


async def loadgen(
    settings: Settings, *, count: int, rate: float | None = None, invalid_ratio: float = 0.0,
    duplicate_ratio: float = 0.0, seed: int = 0, concurrency: int = 32, queue_url: str | None = None,
    client: Any = None, on_sent: Callable[[int], None] | None = None,
) -> dict:
    """Send ``count`` bodies to ``queue_url`` (default: the configured queue); return the summary.

    ``on_sent(n)`` is called after each batch (progress bars, benchmarks).
    """
    url = queue_url or settings.sqs.queue_url
    if client is None:
        async with producer_client(settings, concurrency) as c:
            return await loadgen(
                settings, count=count, rate=rate, invalid_ratio=invalid_ratio, duplicate_ratio=duplicate_ratio,
                seed=seed, concurrency=concurrency, queue_url=url, client=c, on_sent=on_sent,
            )
    batches = enumerate(_batches(iter_bodies(count, seed, invalid_ratio=invalid_ratio, duplicate_ratio=duplicate_ratio)))
    sent: Counter = Counter()
    failed = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    interval = 10 / rate if rate else 0.0

    async def worker() -> None:
        nonlocal failed
        send = client.send_message_batch
        for k, (entries, kinds) in batches:  # the shared iterator hands each batch to one worker
            if interval:
                delay = start + k * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            pending = entries
            for attempt in range(SEND_ATTEMPTS):
                try:
                    resp = await send(QueueUrl=url, Entries=pending)
                except (BotoCoreError, ClientError, OSError, asyncio.TimeoutError):
                    if attempt == SEND_ATTEMPTS - 1:
                        break
                    await asyncio.sleep(backoff.delay(attempt + 1))
                    continue
                bad = {f["Id"] for f in resp.get("Failed", ())}
                pending = [e for e in pending if e["Id"] in bad]
                if not pending:
                    break
                await asyncio.sleep(backoff.delay(attempt + 1))
            failed += len(pending)
            ok = len(entries) - len(pending)
            sent.update(kinds)
            if pending:  # attribute the losses to "valid": only the total matters here
                sent["valid"] -= len(pending)
            if on_sent is not None:
                on_sent(ok)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    elapsed = loop.time() - start
    total = sum(sent.values())
    return {
        "queue_url": url,
        "sent": total,
        "valid": sent["valid"],
        "invalid": sent["invalid"],
        "duplicates": sent["duplicate"],
        "failed": failed,
        "seed": seed,
        "target_rate_per_s": rate,
        "elapsed_s": round(elapsed, 3),
        "rate_per_s": round(total / elapsed, 1) if elapsed > 0 else 0.0,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Fill the configured queue (sqs.queue_url) with takehome-shaped login events, as fast as the "
                     "broker takes them or at a fixed rate; prints a JSON summary on stdout. The embedded broker "
                     "lives only while `run` or `bench` runs, so this needs a configured queue.")
    p.add_argument("--count", type=int, required=True, help="messages to send (required)")
    p.add_argument("--rate", type=float, metavar="MSG_PER_S",
                   help="messages per second on a fixed timetable (default: as fast as the broker takes them)")
    p.add_argument("--invalid-ratio", type=float, default=0.0, metavar="X",
                   help="share of bodies that must be dead-lettered, 0-1 (default: %(default)s)")
    p.add_argument("--duplicate-ratio", type=float, default=0.0, metavar="Y",
                   help="share of bodies that repeat a recent one verbatim: the same event sent twice, 0-1 "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bodies (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="SendMessageBatch calls in flight (default: %(default)s)")


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """``python -m pipeline loadgen``: a JSON summary on stdout, a progress bar on a terminal."""
    from ..clients import sqs_problem, queue_backlog
    from ..errors import PreflightError
    from ..console import invocation

    problems = [
        (args.count < 0, "--count must be >= 0"),
        (args.rate is not None and args.rate <= 0, "--rate must be > 0"),
        (not 0 <= args.invalid_ratio <= 1, "--invalid-ratio must be between 0 and 1"),
        (not 0 <= args.duplicate_ratio <= 1, "--duplicate-ratio must be between 0 and 1"),
        (args.concurrency < 1, "--concurrency must be >= 1"),
        (settings.embedded_sqs, "loadgen needs a configured queue (PIPELINE_SQS__QUEUE_URL): the embedded broker "
                                f"lives in memory only while `run` or `bench` runs; `{invocation()} bench` "
                                "starts its own broker and load"),
    ]
    for bad, message in problems:
        if bad:
            print(f"error: {message}", file=sys.stderr)
            return 2
    s = settings.sqs
    async with producer_client(settings, args.concurrency) as client:
        try:
            await queue_backlog(client, s.queue_url)  # the queue exists and answers, before any send
        except (BotoCoreError, ClientError) as exc:
            raise sqs_problem(exc, "queue", s.queue_url, s.endpoint_url) from None
        with progress_bar(args.count) as on_sent:
            summary = await loadgen(
                settings, count=args.count, rate=args.rate, invalid_ratio=args.invalid_ratio,
                duplicate_ratio=args.duplicate_ratio, seed=args.seed, concurrency=args.concurrency,
                client=client, on_sent=on_sent,
            )
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    if summary["failed"]:
        raise PreflightError(f"{summary['failed']} of {args.count} messages could not be sent")
    return 0
