"""Transform stage: parse, validate, normalise and mask SQS message bodies into table rows.

``to_row`` is the pure core (unit- and property-tested); ``Transformer`` is the stage that
moves receive batches from the source's queue to the sink's queue, and sends rejects to
the acker's dead-letter path with a specific reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import re
import socket
from typing import Any

import orjson

from .acker import DeadLetter
from .masking import Masker
from .message import ORIGIN_ATTRIBUTES, ORIGIN_ID, ORIGIN_SENT, UNAUTHENTICATED, has_origin, origin, strip_origin

__all__ = ["COLUMNS", "Rejected", "to_row", "normalise_ip", "origin", "ORIGIN_ATTRIBUTES", "ORIGIN_ID", "ORIGIN_SENT",
           "Transformer"]

log = logging.getLogger("pipeline.transform")

# Column order of every row tuple, of the staging table and of COPY.
COLUMNS = (
    "message_id",
    "user_id",
    "device_type",
    "masked_ip",
    "masked_device_id",
    "locale",
    "app_version",
    "create_date",
)

_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)*")
# A JSON \u0000 escape that is not itself escaped (an even run of backslashes before it).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_REQUIRED = frozenset(("user_id", "device_type", "ip", "device_id", "app_version"))
_DAY_MS = 86_400_000
_EPOCH = dt.date(1970, 1, 1)
_inet_pton, _inet_ntop, _AF_INET = socket.inet_pton, socket.inet_ntop, socket.AF_INET


class Rejected(ValueError):
    """A message that can never become a row. ``rule`` is a stable label for metrics."""

    __slots__ = ("rule",)

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule

    @property
    def reason(self) -> str:
        return self.args[0]


def normalise_ip(text: str) -> str:
    """Canonical text of an IP, so every spelling of one address masks the same.

    IPv4-mapped IPv6 (``::ffff:1.2.3.4``) is folded to its IPv4 form.
    """
    if ":" not in text:  # fast path: a dotted quad already in canonical form is its own answer
        try:
            if _inet_ntop(_AF_INET, _inet_pton(_AF_INET, text)) == text:
                return text
        except (OSError, ValueError):
            pass  # not a plain dotted quad: let ipaddress decide (and word the rejection)
    addr = ipaddress.ip_address(text)
    if addr.version == 6 and addr.ipv4_mapped is not None:  # type: ignore[union-attr]
        addr = addr.ipv4_mapped  # type: ignore[union-attr]
    return addr.compressed


def _text(event: dict[str, Any], field: str, max_len: int) -> str:
    value = event.get(field)
    if value is None:
        raise Rejected(f"{field}.missing", f"{field}: required field is missing or null")
    if type(value) is not str:
        raise Rejected(f"{field}.type", f"{field}: must be a string, got {_json_type(value)}")
    if not value:
        raise Rejected(f"{field}.empty", f"{field}: must not be empty")
    if len(value) > max_len:
        raise Rejected(f"{field}.too_long", f"{field}: longer than {max_len} characters ({len(value)})")
    if "\x00" in value:
        raise Rejected(f"{field}.nul", f"{field}: contains a NUL character")
    return value


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_date_cache: dict[int, dt.date] = {}


def _utc_date(sent_ms: int) -> dt.date:
    day = sent_ms // _DAY_MS
    date = _date_cache.get(day)
    if date is None:
        date = _date_cache[day] = _EPOCH + dt.timedelta(days=day)
    return date


def to_row(body: str | bytes, message_id: str, sent_ms: int, masker: Masker) -> tuple:
    """One validated, masked row in ``COLUMNS`` order, or ``Rejected`` with the reason.

    Reasons name the field and the rule, never the value: they end up in the DLQ,
    in logs and in metrics, where raw PII must not appear.
    """
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        detail = "nesting too deep" if "depth" in str(exc) or "recursion" in str(exc) else "not valid JSON"
        raise Rejected("body.json", f"body: {detail}") from None
    if type(event) is not dict:
        raise Rejected("body.type", f"body: must be a JSON object, got {_json_type(event)}")
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    if "\\u0000" in text and _NUL_ESCAPE.search(text):  # the substring test spares the regex almost always
        raise Rejected("body.nul", "body: contains a NUL character")

    if _REQUIRED.isdisjoint(event):
        raise Rejected("body.not_login_event", "body: not a login event (none of the required fields is present)")
    user_id = _text(event, "user_id", 128)
    device_type = _text(event, "device_type", 32)
    ip = _text(event, "ip", 64)
    device_id = _text(event, "device_id", 256)
    app_version = _text(event, "app_version", 32)
    if not _VERSION.fullmatch(app_version):
        raise Rejected("app_version.format", "app_version: must be a dotted numeric version such as 2.3.0")
    locale = event.get("locale")
    if locale is not None:
        if type(locale) is not str:
            raise Rejected("locale.type", f"locale: must be a string or null, got {_json_type(locale)}")
        if len(locale) > 32:
            raise Rejected("locale.too_long", f"locale: longer than 32 characters ({len(locale)})")
        if "\x00" in locale:
            raise Rejected("locale.nul", "locale: contains a NUL character")
    try:
        ip = normalise_ip(ip)
    except ValueError:
        raise Rejected("ip.invalid", "ip: not a valid IPv4 or IPv6 address") from None

    return (
        message_id,
        user_id,
        device_type,
        masker.mask(ip),
        masker.mask(device_id),
        locale,
        app_version,
        _utc_date(sent_ms),
    )


class Transformer:
    """Turns receive batches into (rows, messages) pairs for the sink.

    Rejected messages go to the acker as dead letters. A message received more than
    ``max_receive_count`` times is dead-lettered as poison before it is parsed, so one
    message that keeps failing downstream cannot block the others forever.

    Origin attributes are checked before anything else, the poison check included: a message
    whose origin does not authenticate (``stages.message``) is dead-lettered with rule
    ``origin.unauthenticated``, and its origin attributes are stripped first, so neither its
    row nor its dead letter (whose ``source_*`` notes a later redrive signs) can carry a
    forged identity. Dead-lettering rather than silently ignoring makes a misbehaving
    producer visible, and the event is not lost: redrive puts it back under its own id.
    """

    def __init__(
        self,
        inbox: asyncio.Queue,
        sink: asyncio.Queue,
        acker: asyncio.Queue,
        masker: Masker,
        stats: Any,
        max_receive_count: int,
    ) -> None:
        self.inbox, self.sink, self.acker = inbox, sink, acker
        self.masker = masker
        self.stats = stats
        self.max_receive_count = max_receive_count

    async def run(self) -> None:
        inbox_get, sink_put, masker, max_rc = self.inbox.get, self.sink.put, self.masker, self.max_receive_count
        auth = masker.origin_auth
        while True:
            batch = await inbox_get()
            if batch is None:
                await sink_put(None)
                return
            rows: list[tuple] = []
            msgs: list[dict] = []
            dead: list[tuple[dict, str, str]] = []
            for msg in batch:
                attrs = msg.get("Attributes") or {}
                try:
                    redriven = has_origin(msg)
                    if redriven:
                        problem = auth.problem(msg)
                        if problem is not None:
                            strip_origin(msg)
                            log.warning("origin attributes not authenticated", extra={"rule": UNAUTHENTICATED,
                                                                                      "reason": problem})
                            raise Rejected(UNAUTHENTICATED, problem)
                    if int(attrs.get("ApproximateReceiveCount", 1)) > max_rc:
                        raise Rejected(
                            "poison",
                            f"poison: received {attrs['ApproximateReceiveCount']} times without being stored",
                        )
                    if redriven:  # authenticated: keep the original's id and date
                        rows.append(to_row(msg["Body"], *origin(msg), masker))
                    else:
                        rows.append(to_row(msg["Body"], msg["MessageId"], int(attrs.get("SentTimestamp", 0)), masker))
                    msgs.append(msg)
                except Rejected as exc:
                    dead.append((msg, exc.rule, exc.reason))
            if dead:
                await self.acker.put(DeadLetter(dead))
            if rows:
                await sink_put((rows, msgs))
