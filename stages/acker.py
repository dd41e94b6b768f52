"""Acknowledgements: delete what is committed, dead-letter what is rejected, give back the rest.

The acker consumes typed outcomes from the transformer and the sink:

- ``Committed``: the rows are in the table; delete the messages (``DeleteMessageBatch``).
- ``DeadLetter``: the messages can never become rows; send them to the DLQ with the reason,
  then delete them. One event of a multi-event message is dead-lettered alone (its JSON, with
  ``source_event_index``), and its message is deleted only once all its events are resolved.
- ``Redeliver``: not stored and not dead; drop the lease so the visibility timeout brings the
  message back.

Deletes and dead letters run on separate capacity. Deletes have ``concurrency`` slots of their
own (an adaptive ``Limiter``, so that deletes keep up with receives at any round trip), so the
acks of committed rows always flow; dead letters go through a few ordered lanes
with bounded attempts. A dead letter that SQS refuses for good (too large for the DLQ, the DLQ
gone, an invalid parameter) is never retried in a loop: the message is not deleted, its lease
is dropped so it returns after its visibility timeout, and it is counted and logged with the
SQS error code. ``refused`` keeps those message ids for ``/readyz`` and ``--until-empty``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, assert_never

from . import backoff, events
from .concurrency import Limiter, tracked
from .message import (
    CONTENT_ENCODING, DL_REASON, DL_RULE, DL_SOURCE_EVENT_INDEX, DL_SOURCE_ID, DL_SOURCE_QUEUE, DL_SOURCE_SENT,
    DL_SOURCE_SIG, OriginAuth, origin,
)
from .parts import Item, body_of, event_index, key_of, log_id, settle, source_of
from .outage import Outage
from .sqs import RETRYABLE, Fault, chunks, classify, classify_entry, error_code, is_fifo, send_batches, unanswered
from .stats import Stats
from .leases import Leases

__all__ = ["Acker", "Committed", "DeadLetter", "Redeliver", "Outcome", "ENTRY_ATTEMPTS", "DEAD_LETTER_ATTEMPTS"]

log = logging.getLogger("pipeline.acker")

ENTRY_ATTEMPTS = 8  # delete entries failing for transient reasons are given up after this many calls
DEAD_LETTER_ATTEMPTS = 6  # dead-letter sends likewise (about 10 s of backoff): the message then comes back
DEAD_LETTER_LANES = 2  # concurrent dead-letter sends; a FIFO group always uses the same lane, in order


# Outcomes are about items: a message of one event, or one event (``stages.parts.Part``) of a
# multi-event message. ``settle`` turns resolved items into messages to delete or give back: a
# split message goes only once its last event is resolved.


@dataclass(slots=True, frozen=True)
class Committed:
    """Items whose rows are committed (inserted, or already there): delete their messages."""

    msgs: list[Item]


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """Items that can never become rows, each with its rule and reason: DLQ, then delete."""

    entries: list[tuple[Item, str, str]]


@dataclass(slots=True, frozen=True)
class Redeliver:
    """Items to leave for redelivery: the message's lease is dropped, the visibility timeout brings it back."""

    msgs: list[Item]


Outcome = Committed | DeadLetter | Redeliver


class Acker:
    """Deletes committed messages in batches of 10, concurrently; dead-letters rejects on lanes of their own."""

    def __init__(
        self, client: Any, queue_url: str, dlq_url: str, inbox: asyncio.Queue, leases: Leases,
        stats: Stats, concurrency: int | Limiter, *, dead_letter_lanes: int = DEAD_LETTER_LANES,
        dead_letter_attempts: int = DEAD_LETTER_ATTEMPTS, outage: Outage | None = None, auth: OriginAuth | None = None,
    ) -> None:
        self.client, self.queue_url, self.dlq_url = client, queue_url, dlq_url
        self.inbox, self.leases, self.stats = inbox, leases, stats
        # Shared with the source in a run: one outage, one backoff.
        self.outage = outage or Outage("sqs", stats, unanswered=unanswered)
        self.auth = auth  # signs the identity a dead letter notes; without it, redrive will not trust the notes
        self.fifo = is_fifo(queue_url)
        self.dead_letter_attempts = dead_letter_attempts
        self.refused: dict[str, str] = {}  # message id -> SQS error code of its last refused dead letter
        self.limit = tracked("delete", stats, concurrency)  # a plain number: pinned
        self._tasks: set[asyncio.Task] = set()
        self._lanes: list[asyncio.Queue] = [asyncio.Queue() for _ in range(max(1, dead_letter_lanes))]
        self._turn = 0

    async def run(self) -> None:
        lanes = [asyncio.create_task(self._lane(q), name=f"dead-letter-lane-{i}") for i, q in enumerate(self._lanes)]
        try:
            while True:
                item: Outcome | None = await self.inbox.get()
                match item:
                    case None:
                        break
                    case Committed(msgs):
                        done, back = settle(msgs)
                        self._drop(back)
                        for chunk in chunks(done):
                            await self._spawn_delete(chunk)
                    case DeadLetter(entries):
                        self._route(entries)
                    case Redeliver(msgs):
                        self._drop(settle(msgs, keep=True)[1])
                    case _:
                        assert_never(item)
            for q in self._lanes:
                q.put_nowait(None)
            await asyncio.gather(*lanes)
            if self._tasks:
                await asyncio.gather(*self._tasks)
        finally:
            for t in lanes:
                t.cancel()

    # -- deletes ---------------------------------------------------------------------------

    async def _spawn_delete(self, msgs: Any) -> None:
        """Start a delete call once a slot is free; only deletes take these slots."""
        await self.limit.acquire()
        task = asyncio.create_task(self._delete(msgs))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.limit.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("delete task failed", extra={"error": error_code(task.exception())})  # type: ignore[arg-type]

    async def _delete(self, msgs: Any) -> None:
        """Delete ``msgs``; transient failures are retried, permanent ones dropped (they come back, deduplicated).

        A plain loop rather than tenacity: this runs once per 10 messages, and the retry machinery
        around every call was about 5 % of the pipeline's CPU per message at loopback, for a path
        that almost never retries.
        """
        pending = {str(i): m["ReceiptHandle"] for i, m in enumerate(msgs)}
        limit, clock, stats, leases, outage = self.limit, time.monotonic, self.stats, self.leases, self.outage
        attempt = 0
        while True:
            attempt += 1
            ticket = await outage.admit()
            t0 = clock()
            try:
                resp = await self.client.delete_message_batch(
                    QueueUrl=self.queue_url, Entries=[{"Id": i, "ReceiptHandle": h} for i, h in pending.items()])
            except RETRYABLE as exc:
                limit.observe(clock() - t0, failed=True)
                if outage.settled(ticket, exc):  # SQS is out of reach: the shared outage paces the retry
                    events.sqs_call_failed(stats, "DeleteMessageBatch", exc, Fault.TRANSIENT, attempt=attempt)
                    continue
                if classify(exc) is not Fault.TRANSIENT:  # permanent: the queue is gone or the request refused
                    events.sqs_call_failed(stats, "DeleteMessageBatch", exc, Fault.PERMANENT)
                    leases.drop(list(pending.values()))
                    return
                events.sqs_call_failed(stats, "DeleteMessageBatch", exc, Fault.TRANSIENT, attempt=attempt)
                await asyncio.sleep(backoff.delay(attempt))
                continue
            rtt = clock() - t0
            outage.settled(ticket)
            stats.rtt["DeleteMessageBatch"].observe(rtt)
            done = [pending.pop(e["Id"]) for e in resp.get("Successful", ())]
            stats.acked += len(done)
            leases.drop(done)
            failed = resp.get("Failed")
            if failed:
                last_try = attempt >= ENTRY_ATTEMPTS
                for f in failed:
                    if last_try or classify_entry(f) is Fault.PERMANENT:
                        events.delete_failed_for_good(stats, str(f.get("Code")))
                        leases.drop([pending.pop(f["Id"])])
                    else:
                        stats.ack_failures += 1
            limit.observe(rtt, len(done), failed=bool(pending))  # entries to retry: throttled or failing
            if not pending:
                return
            await asyncio.sleep(backoff.delay(attempt))

    # -- dead letters ------------------------------------------------------------------------

    def _route(self, entries: list[tuple[Item, str, str]]) -> None:
        """Hand dead letters to a lane: a FIFO group always to the same one, so its order holds."""
        if not self.fifo:
            self._lanes[self._turn % len(self._lanes)].put_nowait(entries)
            self._turn += 1
            return
        by_lane: dict[int, list] = {}
        for d in entries:
            group = (source_of(d[0]).get("Attributes") or {}).get("MessageGroupId", "")
            by_lane.setdefault(hash(group) % len(self._lanes), []).append(d)
        for lane, part in by_lane.items():
            self._lanes[lane].put_nowait(part)

    async def _lane(self, q: asyncio.Queue) -> None:
        while (entries := await q.get()) is not None:
            for chunk in send_batches(entries, lambda d: body_of(d[0])):
                await self._send_dead(chunk)

    def _dead_attributes(self, item: Item, rule: str, reason: str, body: str) -> dict:
        """Why, and which event: ``redrive`` turns the source id and time (and event index) back into the row's identity.

        ``origin(msg)`` is safe here: the transformer has stripped origin attributes that do not
        authenticate. The notes are signed with the body, so redrive can tell them from a note
        that someone with access to the DLQ wrote.
        """
        msg = source_of(item)
        mid, sent = origin(msg)
        attrs = {
            DL_REASON: {"DataType": "String", "StringValue": reason},
            DL_RULE: {"DataType": "String", "StringValue": rule},
            DL_SOURCE_ID: {"DataType": "String", "StringValue": mid},
            DL_SOURCE_SENT: {"DataType": "Number", "StringValue": str(sent)},
            DL_SOURCE_QUEUE: {"DataType": "String", "StringValue": self.queue_url},
        }
        index = event_index(item)
        if index is not None:  # one event of a batch: its body is that event's JSON alone
            attrs[DL_SOURCE_EVENT_INDEX] = {"DataType": "Number", "StringValue": str(index)}
        elif CONTENT_ENCODING in (msg.get("MessageAttributes") or {}):  # the whole body, still encoded
            attrs[CONTENT_ENCODING] = {"DataType": "String",
                                       "StringValue": msg["MessageAttributes"][CONTENT_ENCODING].get("StringValue", "")}
        if self.auth is not None and mid:
            attrs[DL_SOURCE_SIG] = {"DataType": "String", "StringValue": self.auth.sign(key_of(item), sent, body, note=True)}
        return attrs

    def _dead_entry(self, i: int, item: Item, rule: str, reason: str) -> dict:
        body = body_of(item)
        entry = {"Id": str(i), "MessageBody": body, "MessageAttributes": self._dead_attributes(item, rule, reason, body)}
        if self.fifo:  # keep the group, so the DLQ holds a group's dead letters in their order
            entry["MessageGroupId"] = (source_of(item).get("Attributes") or {}).get("MessageGroupId") or "dead-letters"
            # One dead letter per event: a resend after a crash is dropped by the DLQ's deduplication.
            entry["MessageDeduplicationId"] = hashlib.sha256(key_of(item).encode()).hexdigest()
        return entry

    async def _send_dead(self, chunk: list[tuple[Item, str, str]]) -> None:
        """Send ``chunk`` to the DLQ with bounded attempts; delete what was sent, give back the rest."""
        pending = {str(i): d for i, d in enumerate(chunk)}
        entries = {i: self._dead_entry(int(i), *d) for i, d in pending.items()}
        attempt, outage = 0, self.outage
        while pending:
            attempt += 1
            ticket = await outage.admit()
            try:
                resp = await self.client.send_message_batch(QueueUrl=self.dlq_url, Entries=[entries[i] for i in pending])
            except RETRYABLE as exc:
                fault, reached = classify(exc), not outage.settled(ticket, exc)
                events.sqs_call_failed(self.stats, "SendMessageBatch", exc, fault, queue="dlq", attempt=attempt)
                match fault:
                    case Fault.PERMANENT:
                        self._refuse(list(pending.values()), error_code(exc))
                        return
                    case Fault.TRANSIENT:
                        if attempt >= self.dead_letter_attempts:
                            self._give_back(list(pending.values()), exc)
                            return
                if reached:  # out of reach, the shared outage paces the retry; else this backs off alone
                    await asyncio.sleep(backoff.delay(attempt))
                continue
            outage.settled(ticket)
            sent = [pending.pop(ok["Id"]) for ok in resp.get("Successful", ()) if ok["Id"] in pending]
            if sent:
                await self._dead_lettered(sent)
            transient_code = ""
            for f in resp.get("Failed", ()):
                d = pending.get(f["Id"])
                if d is None:
                    continue
                match classify_entry(f):
                    case Fault.PERMANENT:
                        del pending[f["Id"]]
                        self._refuse([d], str(f.get("Code")))
                    case Fault.TRANSIENT:
                        transient_code = str(f.get("Code"))
            if pending:
                if attempt >= self.dead_letter_attempts:
                    self._give_back(list(pending.values()), transient_code or "unknown")
                    return
                await asyncio.sleep(backoff.delay(attempt))

    async def _dead_lettered(self, sent: list[tuple[Item, str, str]]) -> None:
        for item, rule, reason in sent:
            self.refused.pop(source_of(item)["MessageId"], None)
            events.dead_lettered(self.stats, rule, reason, log_id(item))
        done, back = settle([item for item, _, _ in sent])
        self._drop(back)
        for chunk in chunks(done):
            await self._spawn_delete(chunk)

    def _refuse(self, dead: list[tuple[Item, str, str]], code: str) -> None:
        for item, rule, _ in dead:
            self.refused[source_of(item)["MessageId"]] = code  # the message stays: counted once
            events.dead_letter_refused(self.stats, code, rule, log_id(item), fifo=self.fifo)
        self._drop(settle([item for item, _, _ in dead], keep=True)[1])

    def _give_back(self, dead: list[tuple[Item, str, str]], exc_or_code: BaseException | str) -> None:
        events.dead_letters_given_up(self.stats, len(dead), exc_or_code)
        self._drop(settle([item for item, _, _ in dead], keep=True)[1])

    def _drop(self, msgs: list[dict]) -> None:
        """Give messages back: their leases go, the visibility timeout brings them back."""
        if msgs:
            self.leases.drop([m["ReceiptHandle"] for m in msgs])
