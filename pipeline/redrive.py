"""``python -m pipeline redrive``: put dead letters back on the source queue, after a fix.

Each DLQ message is sent to the source queue with its original body, then deleted from the
DLQ: send before delete, so an interruption can duplicate a message but never lose one. The
duplicate is harmless: the copy carries the original message id and send time
(``origin_message_id``, ``origin_sent_timestamp``), which the transformer uses as the row's
key and date, so a redriven event is stored once, however often it is redriven.

Only dead letters that were in the DLQ when the command started are moved: one that is
rejected again while redrive runs is left for the next redrive instead of going round in
a loop.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from stages.acker import _describe, send_batches
from stages.transform import ORIGIN_ID, ORIGIN_SENT

from .runner import PreflightError, check_queues, sqs_client
from .settings import Settings

__all__ = ["redrive"]

log = logging.getLogger("pipeline.redrive")

# Attributes the acker sets on a dead letter; they describe the rejection, not the event.
DEAD_LETTER_ATTRIBUTES = frozenset(("reason", "rule", "source_message_id", "source_sent_timestamp", "source_queue"))
_HIDE_S = 60  # how long a received dead letter stays hidden while it is being moved


def _entry(i: int, msg: dict) -> dict:
    """The source-queue copy of a dead letter: original body, the event's identity, no rejection notes."""
    attrs = msg.get("MessageAttributes") or {}
    keep = {
        name: {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
        for name, value in attrs.items()
        if name not in DEAD_LETTER_ATTRIBUTES and name not in (ORIGIN_ID, ORIGIN_SENT)
    }
    mid = (attrs.get("source_message_id") or attrs.get(ORIGIN_ID) or {}).get("StringValue") or msg["MessageId"]
    sent = ((attrs.get("source_sent_timestamp") or attrs.get(ORIGIN_SENT) or {}).get("StringValue")
            or msg["Attributes"]["SentTimestamp"])
    keep[ORIGIN_ID] = {"DataType": "String", "StringValue": mid}
    keep[ORIGIN_SENT] = {"DataType": "Number", "StringValue": str(sent)}
    return {"Id": str(i), "MessageBody": msg["Body"], "MessageAttributes": keep}


async def redrive(settings: Settings, *, limit: int | None = None, wait_seconds: int = 2) -> dict:
    """Move up to ``limit`` dead letters (default: all) back to the source queue; return a summary."""
    s = settings.sqs
    if settings.embedded_sqs:
        raise PreflightError("redrive needs sqs.queue_url: the embedded broker keeps no dead letters between runs")
    started_ms = int(time.time() * 1000)
    moved, failed, later = 0, 0, 0
    by_rule: Counter = Counter()
    async with sqs_client(settings) as client:
        await check_queues(client, settings)
        try:
            while limit is None or moved + failed < limit:
                want = 10 if limit is None else min(10, limit - moved - failed)
                msgs = (await client.receive_message(
                    QueueUrl=s.dlq_url, MaxNumberOfMessages=want, WaitTimeSeconds=wait_seconds,
                    VisibilityTimeout=_HIDE_S, MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["SentTimestamp"],
                )).get("Messages")
                if not msgs:
                    break
                fresh = [m for m in msgs if int(m["Attributes"]["SentTimestamp"]) <= started_ms]
                later += len(msgs) - len(fresh)  # dead-lettered after we started: they reappear later
                for chunk in send_batches(fresh, lambda m: m["Body"]):
                    sent = await _move(client, s.queue_url, s.dlq_url, chunk)
                    moved += len(sent)
                    failed += len(chunk) - len(sent)
                    for m in sent:
                        by_rule[((m.get("MessageAttributes") or {}).get("rule") or {}).get("StringValue", "unknown")] += 1
        except (BotoCoreError, ClientError) as exc:
            raise RuntimeError(f"redrive stopped after moving {moved}: {_describe(exc)}") from None
    summary = {"moved": moved, "failed": failed, "left_for_later": later, "by_rule": dict(by_rule),
               "from": s.dlq_url, "to": s.queue_url}
    log.info("redrive done", extra=summary)
    return summary


async def _move(client: Any, queue_url: str, dlq_url: str, chunk: list[dict]) -> list[dict]:
    """Send ``chunk`` to the source queue, then delete from the DLQ what was sent; return that."""
    resp = await client.send_message_batch(QueueUrl=queue_url, Entries=[_entry(i, m) for i, m in enumerate(chunk)])
    for f in resp.get("Failed", ()):
        log.warning("redrive send failed; the dead letter stays", extra={"error": f.get("Code")})
    sent = [chunk[int(ok["Id"])] for ok in resp.get("Successful", ())]
    if sent:
        resp = await client.delete_message_batch(
            QueueUrl=dlq_url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(sent)])
        for f in resp.get("Failed", ()):  # it is back in the DLQ after _HIDE_S; a rerun moves it again, harmlessly
            log.warning("dead letter sent but not deleted", extra={"error": f.get("Code")})
    return sent
