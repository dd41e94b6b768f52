"""Acknowledgements: delete what is committed, dead-letter what is rejected, keep leases.

``Leases`` is the finalizer state: every received message holds a lease (its receipt
handle) until it is deleted. The source waits for room under ``max_in_flight``; the
acker frees leases; the heartbeat extends visibility of leases held too long; on a
hard stop the runner releases the rest (visibility 0) so another consumer takes them
at once instead of after the visibility timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from pipeline.metrics import Stats

from .transform import origin

__all__ = ["Leases", "Acker", "Heartbeat", "release", "send_batches"]

log = logging.getLogger("pipeline.acker")

RETRYABLE = (BotoCoreError, ClientError, OSError, asyncio.TimeoutError)
_SEND_BATCH_BYTES = 200_000  # stay under SendMessageBatch's 256 KiB per request


# Per-entry failures that no retry can fix.
PERMANENT_ENTRY_ERRORS = frozenset({"ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight", "InvalidIdFormat"})
ENTRY_ATTEMPTS = 8  # entries failing for other reasons are given up after this many calls


class RetryableSqsError(Exception):
    """Some entries of a batch call failed for a reason worth retrying."""


def _retrying(stats: Stats) -> AsyncRetrying:
    def before_sleep(state: Any) -> None:
        stats.errors["sqs"] += 1
        exc = state.outcome.exception()
        log.warning("sqs call failed, retrying", extra={"error": _describe(exc), "attempt": state.attempt_number})

    return AsyncRetrying(
        retry=retry_if_exception_type(RETRYABLE + (RetryableSqsError,)),
        wait=wait_exponential_jitter(multiplier=0.2, max=10, jitter=0.5),
        before_sleep=before_sleep,
        reraise=True,
    )


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'ClientError')}: {err.get('Message', '')}"
    return f"{type(exc).__name__}: {exc}"


def send_batches(items: list, body: Any, overhead: int = 1024) -> list[list]:
    """Split ``items`` into ``SendMessageBatch`` calls: at most 10 entries and ~200 KB each.

    ``body(item)`` is the message body; ``overhead`` covers its attributes. A body near the
    256 KiB message limit travels alone.
    """
    out: list[list] = []
    size = 0
    for item in items:
        n = len(body(item).encode()) + overhead
        if not out or len(out[-1]) == 10 or size + n > _SEND_BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


class Leases:
    """Receipt handles held by this process, and the in-flight cap on them."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.held: dict[str, float] = {}  # receipt handle -> monotonic time of receipt/extension
        self._reserved = 0  # room promised to receive calls under way
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self.held)

    async def reserve(self, n: int) -> None:
        """Wait until ``n`` more messages fit under the cap, and promise them that room."""
        while len(self.held) + self._reserved + n > self.max_in_flight:
            self._room.clear()
            await self._room.wait()
        self._reserved += n

    def unreserve(self, n: int) -> None:
        self._reserved -= n
        self._wake()

    def _wake(self) -> None:
        if len(self.held) + self._reserved < self.max_in_flight:
            self._room.set()

    def add(self, msgs: list[dict]) -> None:
        now = time.monotonic()
        held = self.held
        for m in msgs:
            held[m["ReceiptHandle"]] = now

    def drop(self, handles: list[str]) -> None:
        pop = self.held.pop
        for h in handles:
            pop(h, None)
        self._wake()


class Acker:
    """Deletes committed messages in ``DeleteMessageBatch`` calls of up to 10, concurrently.

    Inbox items are ``("ack", [msg, ...])`` from the sink, ``("dead", [(msg, rule, reason), ...])``
    from the transformer and sink, and ``("retry", [msg, ...])`` from the sink for messages to
    redeliver (their leases are dropped; the visibility timeout brings them back). Dead letters
    are sent to the DLQ with their original body and a ``reason`` attribute, then deleted like
    any committed message. Failed calls are retried with backoff; a receipt handle SQS calls
    invalid is counted and dropped (the message comes back and is deduplicated by the sink).
    """

    def __init__(
        self, client: Any, queue_url: str, dlq_url: str, inbox: asyncio.Queue, leases: Leases,
        stats: Stats, concurrency: int,
    ) -> None:
        self.client, self.queue_url, self.dlq_url = client, queue_url, dlq_url
        self.inbox, self.leases, self.stats = inbox, leases, stats
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        while True:
            item = await self.inbox.get()
            if item is None:
                break
            kind, payload = item
            if kind == "ack":
                for i in range(0, len(payload), 10):
                    await self._spawn(self._delete(payload[i : i + 10]))
            elif kind == "retry":  # not stored, not dead: let the visibility timeout bring it back
                self.leases.drop([m["ReceiptHandle"] for m in payload])
            else:
                await self._spawn(self._dead_letter(payload))
        if self._tasks:
            await asyncio.gather(*self._tasks)

    async def _spawn(self, coro: Any) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("acknowledgement task failed", extra={"error": _describe(task.exception())})

    async def _delete(self, msgs: list[dict]) -> None:
        pending = {str(i): m["ReceiptHandle"] for i, m in enumerate(msgs)}
        async for attempt in _retrying(self.stats):
            with attempt:
                resp = await self.client.delete_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=[{"Id": i, "ReceiptHandle": h} for i, h in pending.items()],
                )
                done = [pending.pop(e["Id"]) for e in resp.get("Successful", ())]
                self.stats.acked += len(done)
                self.leases.drop(done)
                failed = resp.get("Failed", ())
                if failed:
                    self.stats.ack_failures += len(failed)
                    last_try = attempt.retry_state.attempt_number >= ENTRY_ATTEMPTS
                    for f in failed:
                        if last_try or f.get("SenderFault") or f.get("Code") in PERMANENT_ENTRY_ERRORS:
                            # The message stays on the queue, comes back, and the sink deduplicates it.
                            log.warning("delete failed for good", extra={"error": f.get("Code")})
                            self.leases.drop([pending.pop(f["Id"])])
                    if pending:
                        raise RetryableSqsError(f"{len(pending)} deletes failed")

    async def _dead_letter(self, dead: list[tuple[dict, str, str]]) -> None:
        for chunk in send_batches(dead, lambda d: d[0]["Body"]):
            await self._send_dead(chunk)

    def _dead_attributes(self, msg: dict, rule: str, reason: str) -> dict:
        """Why, and which event: ``redrive`` turns the source id and time back into the row's identity."""
        mid, sent = origin(msg)
        return {
            "reason": {"DataType": "String", "StringValue": reason},
            "rule": {"DataType": "String", "StringValue": rule},
            "source_message_id": {"DataType": "String", "StringValue": mid},
            "source_sent_timestamp": {"DataType": "Number", "StringValue": str(sent)},
            "source_queue": {"DataType": "String", "StringValue": self.queue_url},
        }

    async def _send_dead(self, chunk: list[tuple[dict, str, str]]) -> None:
        pending = {
            str(i): {"Id": str(i), "MessageBody": msg["Body"], "MessageAttributes": self._dead_attributes(msg, rule, reason)}
            for i, (msg, rule, reason) in enumerate(chunk)
        }
        async for attempt in _retrying(self.stats):
            with attempt:
                resp = await self.client.send_message_batch(QueueUrl=self.dlq_url, Entries=list(pending.values()))
                for ok in resp.get("Successful", ()):
                    pending.pop(ok["Id"], None)
                if pending:
                    raise RetryableSqsError(f"{len(pending)} dead letters not sent")
        for _, rule, reason in chunk:
            self.stats.rejected_by_rule[rule] += 1
            log.info("dead-lettered", extra={"rule": rule, "reason": reason})
        self.stats.rejected += len(chunk)
        msgs = [m for m, _, _ in chunk]
        for i in range(0, len(msgs), 10):
            await self._delete(msgs[i : i + 10])


class Heartbeat:
    """Extends the visibility of leases held longer than half the visibility timeout.

    Without it, a batch stuck behind a slow database would reappear on the queue and be
    received again; the sink would deduplicate it, but the work is wasted.
    """

    def __init__(self, client: Any, queue_url: str, leases: Leases, stats: Stats, visibility_timeout: int) -> None:
        self.client, self.queue_url, self.leases, self.stats = client, queue_url, leases, stats
        self.timeout = visibility_timeout

    async def run(self) -> None:
        if self.timeout <= 0:
            return
        period = max(1.0, self.timeout / 4)
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - self.timeout / 2
            stale = [h for h, t in self.leases.held.items() if t < cutoff]
            for i in range(0, len(stale), 10):
                chunk = stale[i : i + 10]
                try:
                    resp = await self.client.change_message_visibility_batch(
                        QueueUrl=self.queue_url,
                        Entries=[{"Id": str(j), "ReceiptHandle": h, "VisibilityTimeout": self.timeout} for j, h in enumerate(chunk)],
                    )
                except RETRYABLE as exc:
                    self.stats.errors["sqs"] += 1
                    log.warning("visibility extension failed", extra={"error": _describe(exc)})
                    break
                now = time.monotonic()
                held = self.leases.held
                for ok in resp.get("Successful", ()):
                    h = chunk[int(ok["Id"])]
                    if h in held:
                        held[h] = now
                        self.stats.extended += 1


async def release(client: Any, queue_url: str, leases: Leases, stats: Stats) -> None:
    """Make every held message visible again now, so another consumer can take it."""
    handles = list(leases.held)
    for i in range(0, len(handles), 10):
        chunk = handles[i : i + 10]
        try:
            await client.change_message_visibility_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(j), "ReceiptHandle": h, "VisibilityTimeout": 0} for j, h in enumerate(chunk)],
            )
            stats.released += len(chunk)
        except RETRYABLE as exc:  # they reappear after the visibility timeout anyway
            log.warning("release failed", extra={"error": _describe(exc)})
    leases.drop(handles)
