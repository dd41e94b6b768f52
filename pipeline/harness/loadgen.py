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
from stages.sqs import send_batches

from ..clients import sqs_client
from ..console import progress_bar
from ..settings import Settings
from .shapes import ENVELOPES, Packing, Shape, iter_messages

__all__ = ["loadgen", "producer_client", "add_arguments", "command"]

SEND_ATTEMPTS = 5


def producer_client(settings: Settings, concurrency: int) -> Any:
    """An SQS client sized for ``concurrency`` sends at once, without per-call validation."""
    return sqs_client(settings, concurrency=concurrency, read_timeout=30, parameter_validation=False)


def _batches(messages: Iterator[tuple[str, dict, Counter]]) -> Iterator[tuple[list[dict], Counter]]:
    """``SendMessageBatch`` entries and how many events of each kind they hold, lazily: ten messages
    at a time, fewer when large batched bodies would pass the call's size limit."""
    while True:
        window = [m for _, m in zip(range(10), messages)]
        if not window:
            return
        for batch in send_batches(window, lambda m: m[0]):
            entries = []
            for i, (body, attrs, _) in enumerate(batch):
                entry: dict = {"Id": str(i), "MessageBody": body}
                if attrs:
                    entry["MessageAttributes"] = attrs
                entries.append(entry)
            yield entries, sum((k for _, _, k in batch), Counter())


async def loadgen(
    settings: Settings, *, count: int, rate: float | None = None, invalid_ratio: float = 0.0,
    duplicate_ratio: float = 0.0, seed: int = 0, concurrency: int = 32, queue_url: str | None = None,
    client: Any = None, on_sent: Callable[[int], None] | None = None, packing: Packing = Packing(),
) -> dict:
    """Send ``count`` messages to ``queue_url`` (default: the configured queue); return the summary.

    ``packing`` says how many events each message carries and in which shape (``harness.shapes``);
    the ratios apply to events. ``on_sent(n)`` is called after each batch (progress bars, benchmarks).
    """
    url = queue_url or settings.sqs.queue_url
    if client is None:
        async with producer_client(settings, concurrency) as c:
            return await loadgen(
                settings, count=count, rate=rate, invalid_ratio=invalid_ratio, duplicate_ratio=duplicate_ratio,
                seed=seed, concurrency=concurrency, queue_url=url, client=c, on_sent=on_sent, packing=packing,
            )
    batches = enumerate(_batches(iter_messages(count, seed, packing, invalid_ratio=invalid_ratio,
                                               duplicate_ratio=duplicate_ratio)))
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
            sent["messages"] += ok
            if not pending:  # a partly failed call's kinds are not known per message: failed says so
                sent.update(kinds)
            if on_sent is not None:
                on_sent(ok)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    elapsed = loop.time() - start
    total = sent["messages"]
    return {
        "queue_url": url,
        "sent": total,
        "events": sent["valid"] + sent["invalid"] + sent["duplicate"],
        "valid": sent["valid"],
        "invalid": sent["invalid"],
        "duplicates": sent["duplicate"],
        "undecodable": sent["undecodable"],
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
    p.add_argument("--events-per-message", type=int, default=1, metavar="N",
                   help="events per message: more than 1 sends batches (a JSON array unless --framing ndjson); "
                        "with --mix, up to N (default: %(default)s)")
    p.add_argument("--framing", choices=("array", "ndjson"), default="array",
                   help="how a batch is framed: a JSON array or newline-delimited JSON (default: %(default)s)")
    p.add_argument("--gzip", action="store_true", help="gzip each body and base64 it (as producers do to fit 256 KiB)")
    p.add_argument("--envelope", choices=ENVELOPES, default="none",
                   help="wrap each body in an SNS notification or an EventBridge event (default: %(default)s)")
    p.add_argument("--mix", action="store_true",
                   help="every message a random shape: each envelope x encoding x framing, 1..N events")
    p.add_argument("--undecodable-ratio", type=float, default=0.0, metavar="Z",
                   help="share of messages that cannot be decoded at all (bad base64 or gzip, an envelope without "
                        "its payload, an empty batch), 0-1 (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="SendMessageBatch calls in flight (default: %(default)s)")


def packing(args: argparse.Namespace) -> Packing:
    framing = "single" if args.events_per_message == 1 and not args.mix else args.framing
    return Packing(events_per_message=args.events_per_message, shape=Shape(args.envelope, args.gzip, framing),
                   mix=args.mix, undecodable_ratio=args.undecodable_ratio)


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
        (not 0 <= args.undecodable_ratio <= 1, "--undecodable-ratio must be between 0 and 1"),
        (args.events_per_message < 1, "--events-per-message must be >= 1"),
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
                client=client, on_sent=on_sent, packing=packing(args),
            )
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    if summary["failed"]:
        raise PreflightError(f"{summary['failed']} of {args.count} messages could not be sent")
    return 0
