"""``python -m pipeline redrive``: put dead letters back on the source queue, after a fix.

Each DLQ message is sent to the source queue with its original body, then deleted from the
DLQ: send before delete, so an interruption can duplicate a message but never lose one. The
duplicate is harmless: the copy carries the original message id and send time
(``origin_message_id``, ``origin_sent_timestamp``), which the transformer uses as the row's
key and date, so a redriven event is stored once, however often it is redriven.

An identity is a trust boundary (see ``stages.message``): redrive is the only thing that
sets one, and it signs it (``origin_signature``) with the active key of the masking ring,
which is why it loads the ring like ``run`` does. The transformer dead-letters origin
attributes that do not verify.

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

from stages.message import (
    DEAD_LETTER_ATTRIBUTES, DL_RULE, DL_SOURCE_EVENT_INDEX, DL_SOURCE_ID, DL_SOURCE_SENT, ORIGIN_ATTRIBUTES, ORIGIN_ID,
    ORIGIN_SENT,
    ORIGIN_SIG, OriginAuth, has_origin, origin, valid_sent,
)
from stages.sqs import describe as _describe, send_batches

from .keyring import with_local_key
from .clients import check_queues, masker_for, sqs_client
from .errors import PreflightError
from .settings import Settings

__all__ = ["redrive"]

log = logging.getLogger("pipeline.redrive")

_HIDE_S = 60  # how long a received dead letter stays hidden while it is being moved


def _identity(msg: dict, auth: OriginAuth) -> tuple[str, str]:
    """The event a dead letter stands for: the acker's ``source_*`` notes (written from a verified
    origin or the message's own id), else a verified origin (a message an SQS redrive policy moved
    with its attributes), else the DLQ message's own id and time. Unverified origin attributes are
    never promoted to a signed identity. The dead letter of one event of a multi-event message
    (``source_event_index``) stands for ``<source id>:<index>``, the key its row would have had."""
    attrs = msg.get("MessageAttributes") or {}
    src_id = (attrs.get(DL_SOURCE_ID) or {}).get("StringValue")
    src_sent = (attrs.get(DL_SOURCE_SENT) or {}).get("StringValue")
    if src_id and valid_sent(src_sent):
        index = (attrs.get(DL_SOURCE_EVENT_INDEX) or {}).get("StringValue")
        if index and index.isdecimal() and len(index) <= 9:
            return f"{src_id}:{int(index)}", src_sent  # type: ignore[return-value]
        return src_id, src_sent  # type: ignore[return-value]
    if has_origin(msg) and auth.problem(msg) is None:
        mid, sent = origin(msg)
        return mid, str(sent)
    return msg["MessageId"], str(msg["Attributes"]["SentTimestamp"])


def _entry(i: int, msg: dict, auth: OriginAuth) -> dict:
    """The source-queue copy of a dead letter: original body, the event's signed identity, no rejection notes."""
    attrs = msg.get("MessageAttributes") or {}
    keep = {
        name: {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
        for name, value in attrs.items()
        if name not in DEAD_LETTER_ATTRIBUTES and name not in ORIGIN_ATTRIBUTES
    }
    mid, sent = _identity(msg, auth)
    keep[ORIGIN_ID] = {"DataType": "String", "StringValue": mid}
    keep[ORIGIN_SENT] = {"DataType": "Number", "StringValue": sent}
    keep[ORIGIN_SIG] = {"DataType": "String", "StringValue": auth.sign(mid, sent, msg["Body"])}
    return {"Id": str(i), "MessageBody": msg["Body"], "MessageAttributes": keep}


async def redrive(settings: Settings, *, limit: int | None = None, wait_seconds: int = 2) -> dict:
    """Move up to ``limit`` dead letters (default: all) back to the source queue; return a summary."""
    s = settings.sqs
    if settings.embedded_sqs:
        raise PreflightError("redrive needs sqs.queue_url: the embedded broker keeps no dead letters between runs")
    auth = (await masker_for(with_local_key(settings))).origin_auth  # before touching the DLQ: no key, no move
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
                    sent = await _move(client, s.queue_url, s.dlq_url, chunk, auth)
                    moved += len(sent)
                    failed += len(chunk) - len(sent)
                    for m in sent:
                        by_rule[((m.get("MessageAttributes") or {}).get(DL_RULE) or {}).get("StringValue", "unknown")] += 1
        except (BotoCoreError, ClientError) as exc:
            raise RuntimeError(f"redrive stopped after moving {moved}: {_describe(exc)}") from None
    summary = {"moved": moved, "failed": failed, "left_for_later": later, "by_rule": dict(by_rule),
               "from": s.dlq_url, "to": s.queue_url}
    log.info("redrive done", extra=summary)
    return summary


async def _move(client: Any, queue_url: str, dlq_url: str, chunk: list[dict], auth: OriginAuth) -> list[dict]:
    """Send ``chunk`` to the source queue, then delete from the DLQ what was sent; return that."""
    resp = await client.send_message_batch(
        QueueUrl=queue_url, Entries=[_entry(i, m, auth) for i, m in enumerate(chunk)])
    for f in resp.get("Failed", ()):
        log.warning("redrive send failed; the dead letter stays", extra={"error": f.get("Code")})
    sent = [chunk[int(ok["Id"])] for ok in resp.get("Successful", ())]
    if sent:
        resp = await client.delete_message_batch(
            QueueUrl=dlq_url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(sent)])
        for f in resp.get("Failed", ()):  # it is back in the DLQ after _HIDE_S; a rerun moves it again, harmlessly
            log.warning("dead letter sent but not deleted", extra={"error": f.get("Code")})
    return sent
