"""Leases: the receipt handles this process holds, and the in-flight cap on them.

Every received message holds a lease until it is deleted, dead-lettered or given back. The
source waits for room under ``max_in_flight`` before it polls; the acker frees leases; the
heartbeat extends the visibility of leases held too long; on a hard stop the runner releases
the rest (visibility 0) so another consumer takes them at once instead of after the timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import events
from .sqs import RETRYABLE, chunks, classify
from .stats import Stats

__all__ = ["Leases", "Heartbeat", "release", "set_visibility", "LONG_BODY_BYTES"]

# A body this long likely holds many events: the transform workers take it (``stages.offload``),
# and it may wait there undecoded while more arrive, so it is estimated on arrival (a shorter one
# counts one row until weighed).
LONG_BODY_BYTES = 4096


class Leases:
    """Receipt handles held by this process, and the in-flight caps on them.

    Messages are capped by count (``max_in_flight``), and also by the rows and bytes they
    carry: one message may hold thousands of events (``stages.decode``), so a message count
    alone would not bound memory. A message weighs its body's length when it arrives, and one
    row; a long one (``LONG_BODY_BYTES``) the rows such a body has held so far (rows per
    body byte of the messages weighed, at least one). The transformer ``weigh``s multi-event,
    compressed and long messages once decoded. Counting one row until then let batches
    of 100-event messages waiting in the transform workers pass the row cap many times over.
    The caps are checked before each poll, so they may be exceeded by what the receive calls
    under way bring.
    """

    def __init__(self, max_in_flight: int, max_rows: int | None = None, max_bytes: int | None = None) -> None:
        self.max_in_flight = max_in_flight
        self.max_rows = max_rows if max_rows is not None else 1 << 62
        self.max_bytes = max_bytes if max_bytes is not None else 1 << 62
        self.held: dict[str, float] = {}  # receipt handle -> monotonic time of receipt/extension
        self.rows = 0  # events held (a message of one event counts one)
        self.bytes = 0  # bodies and decoded payloads held
        self._weight: dict[str, tuple[int, int]] = {}  # receipt handle -> (rows, bytes) counted for it
        self._reserved = 0  # room promised to receive calls under way
        self._rows_per_byte = 0.0  # of the bodies weighed so far (a moving average): how an arrival is counted
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self.held)

    async def reserve(self, n: int) -> None:
        """Wait until ``n`` more messages fit under the cap, and promise them that room."""
        while self.full(n):
            self._room.clear()
            await self._room.wait()
        self._reserved += n

    def full(self, n: int) -> bool:
        """Whether ``reserve(n)`` would wait: the pipeline holds all it may (messages, rows or bytes)."""
        return (len(self.held) + self._reserved + n > self.max_in_flight or self.rows >= self.max_rows
                or self.bytes >= self.max_bytes)

    def unreserve(self, n: int) -> None:
        self._reserved -= n
        self._wake()

    def _wake(self) -> None:
        if (len(self.held) + self._reserved < self.max_in_flight and self.rows < self.max_rows
                and self.bytes < self.max_bytes):
            self._room.set()

    def add(self, msgs: list[dict]) -> None:
        now = time.monotonic()
        held, weight, per_byte = self.held, self._weight, self._rows_per_byte
        size = rows = 0
        for m in msgs:
            h = m["ReceiptHandle"]
            held[h] = now
            n = len(m.get("Body") or "")
            r = (int(n * per_byte) or 1) if n >= LONG_BODY_BYTES else 1
            weight[h] = (r, n)
            size += n
            rows += r
        self.rows += rows
        self.bytes += size

    def weigh(self, handle: str, rows: int, decoded_bytes: int) -> None:
        """The transformer's count of a held message, once decoded: ``rows`` events, ``decoded_bytes`` beyond its body."""
        old = self._weight.get(handle)
        if old is None:  # already dropped
            return
        if old[1]:
            self._rows_per_byte += 0.2 * (rows / old[1] - self._rows_per_byte)
        new = (rows, old[1] + decoded_bytes)
        self._weight[handle] = new
        self.rows += new[0] - old[0]
        self.bytes += new[1] - old[1]

    def drop(self, handles: list[str]) -> None:
        pop, unweigh = self.held.pop, self._weight.pop
        rows = size = 0
        for h in handles:
            pop(h, None)
            w = unweigh(h, None)
            if w is not None:
                rows += w[0]
                size += w[1]
        self.rows -= rows
        self.bytes -= size
        self._wake()


# ChangeMessageVisibilityBatch calls at once. One after another, 5,000 leases at a 50 ms round
# trip took 25 s: longer than the margin the heartbeat leaves before a 30 s timeout runs out.
VISIBILITY_CALLS = 16


async def set_visibility(client: Any, queue_url: str, handles: list[str], seconds: int, stats: Stats) -> list[str]:
    """``ChangeMessageVisibilityBatch`` over ``handles`` in tens, a few calls at once; return the handles that succeeded.

    A failed call is counted and logged, and the calls not yet started are skipped (an outage
    costs one failure, not one per ten leases): whatever they concerned reappears after its
    timeout anyway.
    """
    gate = asyncio.Semaphore(VISIBILITY_CALLS)
    failed = False

    async def call(chunk: list[str]) -> list[str]:
        nonlocal failed
        async with gate:
            if failed:
                return []
            try:
                resp = await client.change_message_visibility_batch(
                    QueueUrl=queue_url,
                    Entries=[{"Id": str(j), "ReceiptHandle": h, "VisibilityTimeout": seconds} for j, h in enumerate(chunk)],
                )
            except RETRYABLE as exc:
                if not failed:
                    failed = True
                    events.sqs_call_failed(stats, "ChangeMessageVisibilityBatch", exc, classify(exc), visibility_s=seconds)
                return []
        return [chunk[int(ok["Id"])] for ok in resp.get("Successful", ())]

    done = await asyncio.gather(*(call(chunk) for chunk in chunks(handles)))
    return [h for part in done for h in part]


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
            await self.beat()

    async def beat(self) -> None:
        """One round: extend every lease older than half the timeout."""
        cutoff = time.monotonic() - self.timeout / 2
        stale = [h for h, t in self.leases.held.items() if t < cutoff]
        if not stale:
            return
        extended = await set_visibility(self.client, self.queue_url, stale, self.timeout, self.stats)
        now = time.monotonic()
        held = self.leases.held
        for h in extended:
            if h in held:
                held[h] = now
                self.stats.extended += 1


async def release(client: Any, queue_url: str, leases: Leases, stats: Stats) -> None:
    """Make every held message visible again now, so another consumer can take it."""
    handles = list(leases.held)
    stats.released += len(await set_visibility(client, queue_url, handles, 0, stats))
    leases.drop(handles)
