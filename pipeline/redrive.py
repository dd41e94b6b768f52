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

The identity a dead letter notes (``source_*``) is promoted only if the acker's
``source_signature`` over it verifies: a note anyone with ``SendMessage`` on the DLQ wrote
would otherwise choose the id (and so the duplicates) and the date of a row. A dead letter
whose note does not verify is put back under its own id and time, like a fresh event, and
counted in ``notes_not_trusted``.

Only dead letters that were in the DLQ when the command started are moved: one that is
rejected again while redrive runs is left for the next redrive instead of going round in
a loop.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from stages.message import (
    DEAD_LETTER_ATTRIBUTES, DL_RULE, DL_SOURCE_EVENT_INDEX, DL_SOURCE_ID, DL_SOURCE_SENT, DL_SOURCE_SIG,
    ORIGIN_ATTRIBUTES, ORIGIN_ID, ORIGIN_SENT, ORIGIN_SIG, OriginAuth, has_origin, origin, valid_sent,
)
from stages.sqs import describe as _describe, send_batches

from .keyring import with_local_key
from .clients import check_queues, masker_for, sqs_client
from .errors import PreflightError
from .settings import Settings

__all__ = ["redrive"]

log = logging.getLogger("pipeline.redrive")

_HIDE_S = 60  # how long a received dead letter stays hidden while it is being moved


class Notes(enum.Enum):
    """What redrive made of the identity a dead letter notes."""

    NONE = "none"  # no notes: not written by the acker
    SIGNED = "signed"  # the acker's signature verifies: promoted
    UNSIGNED_TRUSTED = "unsigned_trusted"  # no signature, and --trust-unsigned-notes: promoted
    NOT_TRUSTED = "not_trusted"  # unsigned, or a signature that does not verify: ignored


def _noted(msg: dict, auth: OriginAuth, trust_unsigned: bool) -> tuple[Notes, str, str]:
    """The identity the acker noted on ``msg`` (``<source id>[:<index>]``, send time) and whether it holds."""
    attrs = msg.get("MessageAttributes") or {}
    src_id = (attrs.get(DL_SOURCE_ID) or {}).get("StringValue")
    src_sent = (attrs.get(DL_SOURCE_SENT) or {}).get("StringValue")
    sig = (attrs.get(DL_SOURCE_SIG) or {}).get("StringValue")
    if not src_id or not valid_sent(src_sent):
        return (Notes.NOT_TRUSTED if sig else Notes.NONE), "", ""
    index = (attrs.get(DL_SOURCE_EVENT_INDEX) or {}).get("StringValue")
    mid = f"{src_id}:{int(index)}" if index and index.isdecimal() and len(index) <= 9 else src_id
    if not sig:
        return (Notes.UNSIGNED_TRUSTED if trust_unsigned else Notes.NOT_TRUSTED), mid, src_sent  # type: ignore[return-value]
    if auth.mismatch(mid, src_sent, msg["Body"], sig, DL_SOURCE_SIG, note=True) is None:  # type: ignore[arg-type]
        return Notes.SIGNED, mid, src_sent  # type: ignore[return-value]
    return Notes.NOT_TRUSTED, mid, src_sent  # type: ignore[return-value]


def _identity(msg: dict, auth: OriginAuth, trust_unsigned: bool = False) -> tuple[Notes, str, str]:
    """The event a dead letter stands for: the acker's ``source_*`` notes if they verify (written
    from a verified origin or the message's own id), else a verified origin (a message an SQS
    redrive policy moved with its attributes), else the DLQ message's own id and time. Unverified
    notes or origin attributes are never promoted to a signed identity. The dead letter of one
    event of a multi-event message (``source_event_index``) stands for ``<source id>:<index>``,
    the key its row would have had."""
    notes, mid, sent = _noted(msg, auth, trust_unsigned)
    match notes:
        case Notes.SIGNED | Notes.UNSIGNED_TRUSTED:
            return notes, mid, sent
        case Notes.NONE | Notes.NOT_TRUSTED:
            pass
    if has_origin(msg) and auth.problem(msg) is None:
        o_mid, o_sent = origin(msg)
        return notes, o_mid, str(o_sent)
    return notes, msg["MessageId"], str(msg["Attributes"]["SentTimestamp"])


def _entry(i: int, msg: dict, auth: OriginAuth, trust_unsigned: bool = False, untrusted: list[str] | None = None) -> dict:
    """The source-queue copy of a dead letter: original body, the event's signed identity, no rejection notes."""
    attrs = msg.get("MessageAttributes") or {}
    keep = {
        name: {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
        for name, value in attrs.items()
        if name not in DEAD_LETTER_ATTRIBUTES and name not in ORIGIN_ATTRIBUTES
    }
    notes, mid, sent = _identity(msg, auth, trust_unsigned)
    if notes is Notes.NOT_TRUSTED and untrusted is not None:
        untrusted.append(msg["MessageId"])
    keep[ORIGIN_ID] = {"DataType": "String", "StringValue": mid}
    keep[ORIGIN_SENT] = {"DataType": "Number", "StringValue": sent}
    keep[ORIGIN_SIG] = {"DataType": "String", "StringValue": auth.sign(mid, sent, msg["Body"])}
    return {"Id": str(i), "MessageBody": msg["Body"], "MessageAttributes": keep}


async def redrive(settings: Settings, *, limit: int | None = None, wait_seconds: int = 2,
                  trust_unsigned_notes: bool = False) -> dict:
    """Move up to ``limit`` dead letters (default: all) back to the source queue; return a summary."""
    s = settings.sqs
    if settings.embedded_sqs:
        raise PreflightError("redrive needs sqs.queue_url: the embedded broker keeps no dead letters between runs")
    auth = (await masker_for(with_local_key(settings))).origin_auth  # before touching the DLQ: no key, no move
    started_ms = int(time.time() * 1000)
    moved, failed, later = 0, 0, 0
    untrusted: list[str] = []  # DLQ message ids moved whose noted identity did not verify: put back under their own
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
                    doubtful: list[str] = []
                    entries = [_entry(i, m, auth, trust_unsigned_notes, doubtful) for i, m in enumerate(chunk)]
                    sent = await _move(client, s.queue_url, s.dlq_url, chunk, entries)
                    untrusted += [m["MessageId"] for m in sent if m["MessageId"] in doubtful]
                    moved += len(sent)
                    failed += len(chunk) - len(sent)
                    for m in sent:
                        by_rule[((m.get("MessageAttributes") or {}).get(DL_RULE) or {}).get("StringValue", "unknown")] += 1
        except (BotoCoreError, ClientError) as exc:
            raise RuntimeError(f"redrive stopped after moving {moved}: {_describe(exc)}") from None
    summary = {"moved": moved, "failed": failed, "left_for_later": later, "by_rule": dict(by_rule),
               "notes_not_trusted": len(untrusted), "from": s.dlq_url, "to": s.queue_url}
    if untrusted:
        log.warning("dead letters whose noted identity did not verify were put back under their own id and time",
                    extra={"messages": len(untrusted), "dlq_message_ids": untrusted[:20]})
    log.info("redrive done", extra=summary)
    return summary


async def _move(client: Any, queue_url: str, dlq_url: str, chunk: list[dict], entries: list[dict]) -> list[dict]:
    """Send ``entries`` (``chunk`` as source-queue copies) to the source queue, then delete from the DLQ what was sent."""
    resp = await client.send_message_batch(QueueUrl=queue_url, Entries=entries)
    for f in resp.get("Failed", ()):
        log.warning("redrive send failed; the dead letter stays", extra={"error": f.get("Code")})
    sent = [chunk[int(ok["Id"])] for ok in resp.get("Successful", ())]
    if sent:
        resp = await client.delete_message_batch(
            QueueUrl=dlq_url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(sent)])
        for f in resp.get("Failed", ()):  # it is back in the DLQ after _HIDE_S; a rerun moves it again, harmlessly
            log.warning("dead letter sent but not deleted", extra={"error": f.get("Code")})
    return sent
