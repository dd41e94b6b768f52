"""Message shapes real producers send: envelopes, encodings and framings around login events.

The inverse of ``stages.decode``, for ``loadgen``, ``bench`` and the tests: one place that knows
what an SNS notification, an EventBridge event, a JSON-array or newline-delimited batch and a
gzip+base64 body look like, so every producer of test traffic builds them the same way.
"""

from __future__ import annotations

import base64
import gzip as _gzip
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from itertools import repeat
from typing import Iterator

import orjson

from ..sample import iter_bodies

__all__ = ["Shape", "SHAPES", "ENVELOPES", "FRAMINGS", "Packing", "encode", "undecodable", "UNDECODABLE_KINDS",
           "iter_messages"]

ENVELOPES = ("none", "sns", "eventbridge")
FRAMINGS = ("single", "array", "ndjson")
TOPIC_ARN = "arn:aws:sns:us-east-1:000000000000:logins"


@dataclass(frozen=True)
class Shape:
    envelope: str = "none"  # none | sns | eventbridge
    gzip: bool = False
    framing: str = "single"  # single | array | ndjson

    def __str__(self) -> str:
        return f"{self.envelope}+{'gzip' if self.gzip else 'plain'}+{self.framing}"


# Every combination: 3 envelopes x 2 encodings x 3 framings.
SHAPES = tuple(Shape(e, g, f) for e in ENVELOPES for g in (False, True) for f in FRAMINGS)


def _element(text: str) -> bytes:
    """An event text as an array element: itself if it is JSON, else as a JSON string (a bad event either way)."""
    try:
        orjson.loads(text)
        return text.strip().encode()
    except orjson.JSONDecodeError:
        return orjson.dumps(text)


def encode(events: list[str], shape: Shape, *, attribute: bool = False) -> tuple[str, dict]:
    """``(body, message attributes)`` carrying ``events`` (JSON texts) in ``shape``.

    ``single`` takes exactly one event. ``attribute`` also sets ``content-encoding: gzip`` on a
    gzipped body (detection from the data works without it).
    """
    if shape.framing == "single":
        if len(events) != 1:
            raise ValueError("a single-event shape carries exactly one event")
        payload = events[0].encode()
    elif shape.framing == "array":
        payload = b"[" + b",".join(_element(e) for e in events) + b"]"
    elif shape.framing == "ndjson":
        payload = b"\n".join(e.encode() for e in events) + b"\n"
    else:
        raise ValueError(f"unknown framing {shape.framing!r}")
    text = base64.b64encode(_gzip.compress(payload, 6, mtime=0)).decode() if shape.gzip else payload.decode()
    attrs: dict = {}
    if shape.gzip and attribute:
        attrs["content-encoding"] = {"DataType": "String", "StringValue": "gzip"}
    if shape.envelope == "none":
        return text, attrs
    if shape.envelope == "sns":
        note = {"Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": TOPIC_ARN, "Message": text,
                "Timestamp": "2026-01-01T00:00:00.000Z", "SignatureVersion": "1"}
        if shape.gzip and attribute:
            note["MessageAttributes"] = {"content-encoding": {"Type": "String", "Value": "gzip"}}
            attrs = {}
        return orjson.dumps(note).decode(), attrs
    if shape.envelope == "eventbridge":
        detail: object = text  # an encoded or framed batch rides as a string
        if shape.framing == "single" and not shape.gzip:
            try:
                parsed = orjson.loads(text)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                detail = parsed  # what EventBridge itself delivers: the event as the detail object
        event = {"version": "0", "id": str(uuid.uuid4()), "detail-type": "user.login", "source": "app.logins",
                 "account": "000000000000", "time": "2026-01-01T00:00:00Z", "region": "us-east-1",
                 "resources": [], "detail": detail}
        return orjson.dumps(event).decode(), {}
    raise ValueError(f"unknown envelope {shape.envelope!r}")


UNDECODABLE_KINDS = ("bad_base64", "truncated_gzip", "sns_without_message", "eventbridge_without_detail", "empty_batch")


def undecodable(kind: str) -> tuple[str, str]:
    """``(body, rule)``: a message that cannot be decoded at all, and the rule it is dead-lettered with."""
    if kind == "bad_base64":
        return "H4sI!!not*base64!!", "encoding.base64"
    if kind == "truncated_gzip":
        whole = base64.b64encode(_gzip.compress(b'[{"user_id": "x"}]' * 20, mtime=0)).decode()
        return base64.b64encode(base64.b64decode(whole)[:-12]).decode(), "encoding.gzip"
    if kind == "sns_without_message":
        return orjson.dumps({"Type": "Notification", "TopicArn": TOPIC_ARN, "MessageId": "x"}).decode(), "envelope.sns"
    if kind == "eventbridge_without_detail":
        return orjson.dumps({"detail-type": "user.login", "source": "app.logins", "id": "x"}).decode(), \
            "envelope.eventbridge"
    if kind == "empty_batch":
        return "[]", "body.type"
    raise ValueError(f"unknown kind {kind!r}")


def mixed(rng: random.Random, max_events: int) -> Iterator[tuple[Shape, int]]:
    """An endless mix of shapes and event counts (1 for ``single``, else 2..``max_events``)."""
    while True:
        shape = rng.choice(SHAPES)
        n = 1 if shape.framing == "single" or max_events < 2 else rng.randint(2, max_events)
        yield shape, n


@dataclass(frozen=True)
class Packing:
    """How ``loadgen`` packs events into messages."""

    events_per_message: int = 1
    shape: Shape = field(default_factory=Shape)  # framing ``single`` becomes ``array`` for several events
    mix: bool = False  # every message a random shape of SHAPES, with 1..events_per_message events
    undecodable_ratio: float = 0.0  # share of messages replaced by one that cannot be decoded at all


def _is_object(text: str) -> bool:
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


def iter_messages(count: int, seed: int, packing: Packing, *, invalid_ratio: float = 0.0,
                  duplicate_ratio: float = 0.0) -> Iterator[tuple[str, dict, Counter]]:
    """``count`` messages as ``(body, message attributes, kinds)``; kinds counts its events by kind
    (``valid``, ``invalid``, ``duplicate``) or is ``{"undecodable": 1}``. Lazy and deterministic.

    Every batch holds at least one JSON object, so a batch is a batch (one dead letter per bad
    event), never a body that is not a batch at all.
    """
    rng = random.Random(seed * 7919 + 1)
    n = max(1, packing.events_per_message)
    bodies = iter_bodies(count * n, seed, invalid_ratio=invalid_ratio, duplicate_ratio=duplicate_ratio)
    clean = iter_bodies(count * n + 1, seed + 1)  # valid events, to keep a batch a batch
    shape = packing.shape
    if n > 1 and shape.framing == "single":
        shape = Shape(shape.envelope, shape.gzip, "array")
    shapes = mixed(rng, n) if packing.mix else repeat((shape, n))
    for _ in range(count):
        if packing.undecodable_ratio and rng.random() < packing.undecodable_ratio:
            yield undecodable(rng.choice(UNDECODABLE_KINDS))[0], {}, Counter(undecodable=1)
            continue
        shape, k = next(shapes)
        events = [next(bodies, None) or next(clean) for _ in range(k)]
        if k > 1 and not any(_is_object(b) for _, b in events):
            events[0] = next(clean)
        body, attrs = encode([b for _, b in events], shape, attribute=shape.gzip and rng.random() < 0.5)
        yield body, attrs, Counter(kind for kind, _ in events)
