"""Decoding a message body into events: envelope, then encoding, then framing. Pure, no I/O.

Real producers rarely send one bare event per message. SNS fan-out wraps the event in a
notification, EventBridge puts it in ``detail``, and high-volume producers batch many events
into one message (a JSON array or newline-delimited JSON), often gzipped and base64-encoded
to fit SQS's size limit. Each layer is optional and detected from the data itself:

1. **envelope** (``sqs.envelope``): an SNS notification is unwrapped to its ``Message``, an
   EventBridge event to its ``detail``; anything else is the payload itself.
2. **encoding**: a payload that is base64 of gzip data (it starts with ``H4s``, which no JSON
   text does), or that a ``content-encoding: gzip`` attribute says is, is decompressed, never
   beyond ``max_decoded_bytes``: a decompression bomb is rejected, not expanded.
3. **framing**: a JSON array or newline-delimited objects are a list of events (at most
   ``max_events``); a single object is one event, exactly as before.

``decode`` raises ``Rejected`` when the message as a whole is unusable (dead-lettered whole,
with its original body). A batch with a bad event in it is still a batch: the bad event comes
back as a ``BadEvent``, so the transformer dead-letters it alone and stores the others.
Reasons name the layer and the rule, never a value.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from .message import CONTENT_ENCODING

__all__ = ["Rejected", "BadEvent", "Decoding", "ENVELOPES", "CONTENT_ENCODING", "decode", "parse_error", "has_nul",
           "json_type"]

ENVELOPES = ("auto", "none", "sns", "eventbridge")
_ENVELOPE_NAMES = {"sns": "an SNS notification", "eventbridge": "an EventBridge event"}
_GZIP_B64 = "H4s"  # base64 of 1f 8b 08: every gzip member starts so, and no JSON text does
# A JSON \u0000 escape that is not itself escaped (an even run of backslashes before it).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_loads, _JSONDecodeError = orjson.loads, orjson.JSONDecodeError


def event_json(value: Any) -> str:
    """The JSON of a parsed value, for a dead letter or a NUL check; never fails on what parsed.

    ``orjson`` reads 1,024 levels of nesting but writes only 255: a deeper event (hostile or
    broken) is written by the standard library instead, with room for its depth, so its dead
    letter still carries it whole rather than crashing the stage that writes it.
    """
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError: nested too deep (or an integer past 64 bits)
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 10_000))
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        finally:
            sys.setrecursionlimit(limit)


class Rejected(ValueError):
    """A message (or an event) that can never become a row. ``rule`` is a stable label for metrics."""

    __slots__ = ("rule",)

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule

    @property
    def reason(self) -> str:
        return self.args[0]


@dataclass(frozen=True, slots=True)
class BadEvent:
    """One event of a batch that cannot become a row; ``text`` is its JSON, the body of its dead letter."""

    text: str
    rule: str
    reason: str


@dataclass(frozen=True, slots=True)
class Decoding:
    """How to decode: the envelope to expect and the caps that keep one message's memory bounded."""

    envelope: str = "auto"
    max_decoded_bytes: int = 10 * 2**20
    max_events: int = 10_000


def json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    if value is None:
        return "null"
    return type(value).__name__


def parse_error(exc: Exception) -> Rejected:
    detail = "nesting too deep" if "depth" in str(exc) or "recursion" in str(exc) else "not valid JSON"
    return Rejected("body.json", f"body: {detail}")


def has_nul(text: str | bytes) -> bool:
    """Whether JSON ``text`` holds a NUL character (an unescaped ``\\u0000``); raw NULs do not parse."""
    if isinstance(text, bytes):
        if b"\\u0000" not in text:  # the substring test spares the regex almost always
            return False
        text = text.decode("utf-8", "replace")
    return "\\u0000" in text and _NUL_ESCAPE.search(text) is not None


_FAILED = object()  # the text is not one JSON document
_UNPARSED = object()  # the text has not been parsed yet


def _parse(text: str | bytes) -> tuple[Any, Exception | None]:
    try:
        return _loads(text), None
    except _JSONDecodeError as exc:
        return _FAILED, exc


def _attribute(attributes: Any, name: str, key: str) -> str | None:
    if not isinstance(attributes, dict):
        return None
    a = attributes.get(name)
    if a is None:
        a = attributes.get(name.title())  # Content-Encoding
    v = a.get(key) if isinstance(a, dict) else None
    return v.strip().lower() if isinstance(v, str) else None


def _envelope(doc: dict) -> str | None:
    if doc.get("Type") == "Notification":
        return "sns"
    if "detail-type" in doc and "source" in doc:
        return "eventbridge"
    return None


def _gunzip(data: bytes, cap: int) -> bytes:
    """Decompress (possibly several concatenated gzip members), never producing more than ``cap`` + 1 bytes."""
    out: list[bytes] = []
    total = 0
    while data:
        d = zlib.decompressobj(wbits=31)
        try:
            chunk = d.decompress(data, cap - total + 1)
        except zlib.error:
            raise Rejected("encoding.gzip", "encoding: not valid gzip data") from None
        total += len(chunk)
        if total > cap:
            raise Rejected("encoding.too_large",
                           f"encoding: decompressed size exceeds pipeline.max_decoded_bytes ({cap} bytes)")
        out.append(chunk)
        if not d.eof:
            raise Rejected("encoding.gzip", "encoding: gzip data is truncated")
        data = d.unused_data
        if data and not data.startswith(b"\x1f\x8b"):
            raise Rejected("encoding.gzip", "encoding: trailing data after the gzip stream")
    return b"".join(out)


def _unbase64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # base64 wrapped into lines (the `base64` tool's default)
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Rejected("encoding.base64", "encoding: not valid base64") from None


def decode(body: str | bytes, attributes: Any, how: Decoding, *, redriven: bool = False) -> tuple[list, int]:
    """``(events, decoded_bytes)``: each event a ``dict`` (a candidate row) or a ``BadEvent``.

    ``decoded_bytes`` is the size of the decompressed payload (0 if there was none), for the
    in-flight byte cap. ``redriven`` (an authenticated redrive) relaxes a required envelope:
    an event's dead letter is the event alone, out of its envelope.
    """
    doc, err = _parse(body)
    mode = how.envelope
    if redriven and mode in _ENVELOPE_NAMES:
        mode = "auto"
    text: str | bytes = body  # the text ``doc`` came from: NUL checks and framing read it
    sns_attributes = None
    if mode != "none":
        kind = _envelope(doc) if type(doc) is dict else None
        if mode != "auto" and kind != mode:
            raise Rejected(f"envelope.{mode}", f"envelope: not {_ENVELOPE_NAMES[mode]} (sqs.envelope = {mode})")
        if kind == "sns":
            message = doc.get("Message")
            if type(message) is not str:
                raise Rejected("envelope.sns", "envelope: SNS notification without a string Message")
            sns_attributes = doc.get("MessageAttributes")
            text, doc = message, _UNPARSED
        elif kind == "eventbridge":
            detail = doc.get("detail")
            if type(detail) is dict:
                doc, text = detail, b""  # parsed already; a NUL in the envelope is not the event's
            elif type(detail) is str:  # an encoded batch carried as a string
                text, doc = detail, _UNPARSED
            else:
                raise Rejected("envelope.eventbridge", "envelope: EventBridge event without a detail object")

    encoding = _attribute(attributes, CONTENT_ENCODING, "StringValue") or _attribute(
        sns_attributes, CONTENT_ENCODING, "Value")
    if encoding in ("", "identity"):
        encoding = None
    if encoding is not None and encoding != "gzip":
        raise Rejected("encoding.unsupported", f"encoding: {CONTENT_ENCODING} is not gzip (the only one supported)")
    decoded = 0
    unparsed = doc is _FAILED or doc is _UNPARSED
    if encoding == "gzip" or unparsed and isinstance(text, str) and text.lstrip()[:3] == _GZIP_B64:
        if not isinstance(text, str) or not text:
            raise Rejected("encoding.gzip", f"encoding: {CONTENT_ENCODING} says gzip but the payload is a JSON object")
        data = _unbase64(text.strip())
        if not data.startswith(b"\x1f\x8b"):
            raise Rejected("encoding.gzip", "encoding: not gzip data")
        text = _gunzip(data, how.max_decoded_bytes)
        decoded, doc = len(text), _UNPARSED

    if doc is _UNPARSED:
        doc, err = _parse(text)
    if doc is _FAILED:
        return _lines(text, err, how), decoded  # type: ignore[arg-type]
    if type(doc) is dict:
        if has_nul(text) if text else has_nul(event_json(doc)):
            raise Rejected("body.nul", "body: contains a NUL character")
        return [doc], decoded
    if type(doc) is list:
        return _array(doc, text, how), decoded
    raise Rejected("body.type", f"body: must be a JSON object, got {json_type(doc)}")


def _array(items: list, text: str | bytes, how: Decoding) -> list:
    if not any(type(e) is dict for e in items):  # not a batch of events (nor an empty one): one bad body
        raise Rejected("body.type", "body: must be a JSON object, got array")
    if len(items) > how.max_events:
        raise Rejected("framing.too_many_events",
                       f"framing: {len(items)} events, more than pipeline.max_events_per_message ({how.max_events})")
    nul = has_nul(text) if text else True
    if not nul and all(type(e) is dict for e in items):  # the usual batch: every item a candidate event
        return items
    events: list = []
    for e in items:
        if type(e) is not dict:
            events.append(BadEvent(event_json(e), "body.type", f"body: must be a JSON object, got {json_type(e)}"))
        elif nul and has_nul(raw := event_json(e)):
            events.append(BadEvent(raw, "body.nul", "body: contains a NUL character"))
        else:
            events.append(e)
    return events


def _lines(text: str | bytes, err: Exception | None, how: Decoding) -> list:
    """Newline-delimited JSON: two or more lines, one of them at least an object. Else the body is bad JSON."""
    nl: Any = b"\n" if isinstance(text, bytes) else "\n"
    lines = [ln for ln in text.split(nl) if ln.strip()] if nl in text else []
    if len(lines) < 2:
        raise parse_error(err)  # type: ignore[arg-type]
    if len(lines) > how.max_events:
        first, _ = _parse(lines[0])
        if type(first) is dict:
            raise Rejected("framing.too_many_events", f"framing: {len(lines)} events, more than "
                                                      f"pipeline.max_events_per_message ({how.max_events})")
        raise parse_error(err)  # type: ignore[arg-type]
    parsed = [_parse(ln) for ln in lines]
    if not any(type(doc) is dict for doc, _ in parsed):
        raise parse_error(err)  # type: ignore[arg-type]
    events: list = []
    for ln, (doc, exc) in zip(lines, parsed):
        line = ln.decode("utf-8", "replace").strip() if isinstance(ln, bytes) else ln.strip()
        if doc is _FAILED:
            bad = parse_error(exc)  # type: ignore[arg-type]
            events.append(BadEvent(line, bad.rule, bad.reason))
        elif type(doc) is not dict:
            events.append(BadEvent(line, "body.type", f"body: must be a JSON object, got {json_type(doc)}"))
        elif has_nul(ln):
            events.append(BadEvent(line, "body.nul", "body: contains a NUL character"))
        else:
            events.append(doc)
    return events
