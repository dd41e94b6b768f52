"""Transform stage: parse, validate, normalise and mask SQS message bodies into table rows.

``to_row`` is the pure core (unit- and property-tested); ``Transformer`` is the stage that
moves receive batches from the source's queue to the sink's queue, and sends rejects to
the acker's dead-letter path with a specific reason.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures.process import BrokenProcessPool
import datetime as dt
import logging
import re
from typing import Any, NamedTuple, assert_never

import orjson

from . import events
from .acker import DeadLetter
from .addresses import normalise_ip
from .decode import BadEvent, Decoding, Rejected, decode, event_json, has_nul, json_type, parse_error
from .leases import LONG_BODY_BYTES
from .masking import Masker
from .message import ORIGIN_ATTRIBUTES, ORIGIN_ID, ORIGIN_SENT, UNAUTHENTICATED, has_origin, origin, strip_origin
from .parts import Group, Part

__all__ = ["COLUMNS", "Rejected", "to_row", "event_row", "normalise_ip", "origin", "ORIGIN_ATTRIBUTES", "ORIGIN_ID",
           "ORIGIN_SENT", "Decoding", "Transformer"]

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
_REQUIRED = frozenset(("user_id", "device_type", "ip", "device_id", "app_version"))
_DAY_MS = 86_400_000
_EPOCH = dt.date(1970, 1, 1)


def _text(event: dict[str, Any], field: str, max_len: int) -> str:
    value = event.get(field)
    if value is None:
        raise Rejected(f"{field}.missing", f"{field}: required field is missing or null")
    if type(value) is not str:
        raise Rejected(f"{field}.type", f"{field}: must be a string, got {json_type(value)}")
    if not value:
        raise Rejected(f"{field}.empty", f"{field}: must not be empty")
    if len(value) > max_len:
        raise Rejected(f"{field}.too_long", f"{field}: longer than {max_len} characters ({len(value)})")
    if "\x00" in value:
        raise Rejected(f"{field}.nul", f"{field}: contains a NUL character")
    return value


_date_cache: dict[int, dt.date] = {}


def _utc_date(sent_ms: int) -> dt.date:
    day = sent_ms // _DAY_MS
    date = _date_cache.get(day)
    if date is None:
        date = _date_cache[day] = _EPOCH + dt.timedelta(days=day)
    return date


def to_row(body: str | bytes, message_id: str, sent_ms: int, masker: Masker) -> tuple:
    """One validated, masked row in ``COLUMNS`` order from a one-event body, or ``Rejected`` with the reason.

    Reasons name the field and the rule, never the value: they end up in the DLQ,
    in logs and in metrics, where raw PII must not appear.
    """
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise parse_error(exc) from None
    if type(event) is not dict:
        raise Rejected("body.type", f"body: must be a JSON object, got {json_type(event)}")
    if has_nul(body):
        raise Rejected("body.nul", "body: contains a NUL character")
    return event_row(event, message_id, sent_ms, masker)


def event_row(event: dict, message_id: str, sent_ms: int, masker: Masker) -> tuple:
    """The row of one decoded event (a JSON object without NUL characters; see ``stages.decode``).

    Two paths, one contract. The fast one takes an event that passes every rule, checked in
    one expression with no call per field; anything it is not sure of goes to ``_checked_row``,
    which applies the rules in order and words the first one broken. Both accept exactly the
    same events (``tests/unit/test_transform.py`` checks them against each other).
    """
    get = event.get
    user_id, device_type, ip = get("user_id"), get("device_type"), get("ip")
    device_id, app_version, locale = get("device_id"), get("app_version"), get("locale")
    if not (type(user_id) is str and type(device_type) is str and type(ip) is str and type(device_id) is str
            and type(app_version) is str and (locale is None or (type(locale) is str and len(locale) <= 32
                                                                    and "\x00" not in locale))
            and 0 < len(user_id) <= 128 and 0 < len(device_type) <= 32 and 0 < len(ip) <= 64
            and 0 < len(device_id) <= 256 and 0 < len(app_version) <= 32
            and "\x00" not in user_id and "\x00" not in device_type and "\x00" not in ip
            and "\x00" not in device_id and (app_version in _versions or _good_version(app_version))):
        return _checked_row(event, message_id, sent_ms, masker)
    try:
        ip = normalise_ip(ip)
    except ValueError:
        raise Rejected("ip.invalid", "ip: not a valid IPv4 or IPv6 address") from None
    mask = masker.mask
    return (message_id, user_id, device_type, mask(ip), mask(device_id), locale, app_version, _utc_date(sent_ms))


_versions: set[str] = set()  # app versions seen valid: a handful of values, checked once each


def _good_version(text: str) -> bool:
    if "\x00" in text or not _VERSION.fullmatch(text):
        return False
    if len(_versions) >= 1024:
        _versions.clear()
    _versions.add(text)
    return True


def _checked_row(event: dict, message_id: str, sent_ms: int, masker: Masker) -> tuple:
    """``event_row``'s rules one by one: the row, or ``Rejected`` naming the first rule broken."""
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
            raise Rejected("locale.type", f"locale: must be a string or null, got {json_type(locale)}")
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


class One(NamedTuple):
    """A message of one event: its row, keyed by the message id as always."""

    row: tuple
    decoded: int


class Many(NamedTuple):
    """A message of ``n`` events: rows keyed ``<message id>:<i>`` for the events at ``indexes``, and
    the bad events as ``(index, text, rule, reason)``."""

    n: int
    decoded: int
    rows: list
    indexes: list
    bad: list


class Reject(NamedTuple):
    """The whole message is dead-lettered: undecodable, over a cap, or its one event is bad."""

    rule: str
    reason: str


def transform_message(body: str | bytes, attributes: Any, key: str, sent: int, redriven: bool,
                      masker: Masker, how: Decoding) -> One | Many | Reject:
    """What one message becomes, as plain data: the same inline and in a transform worker."""
    try:
        events, decoded = decode(body, attributes, how, redriven=redriven)
        if len(events) == 1:
            event = events[0]
            if type(event) is BadEvent:
                return Reject(event.rule, event.reason)
            return One(event_row(event, key, sent, masker), decoded)
    except Rejected as exc:
        return Reject(exc.rule, exc.reason)
    rows: list[tuple] = []
    indexes: list[int] = []
    bad: list[tuple[int, str, str, str]] = []
    for i, event in enumerate(events):
        if type(event) is BadEvent:
            bad.append((i, event.text, event.rule, event.reason))
            continue
        try:
            rows.append(event_row(event, f"{key}:{i}", sent, masker))
        except Rejected as exc:
            bad.append((i, event_json(event), exc.rule, exc.reason))
            continue
        indexes.append(i)
    return Many(len(events), decoded, rows, indexes, bad)


class Transformer:
    """Turns receive batches into (rows, items) pairs for the sink.

    Rejected messages go to the acker as dead letters. A message received more than
    ``max_receive_count`` times is dead-lettered as poison before it is parsed, so one
    message that keeps failing downstream cannot block the others forever.

    Origin attributes are checked before anything else, the poison check included: a message
    whose origin does not authenticate (``stages.message``) is dead-lettered with rule
    ``origin.unauthenticated``, and its origin attributes are stripped first, so neither its
    row nor its dead letter (whose ``source_*`` notes a later redrive signs) can carry a
    forged identity. Dead-lettering rather than silently ignoring makes a misbehaving
    producer visible, and the event is not lost: redrive puts it back under its own id.

    Then the body is decoded (``stages.decode``). A message of one event travels as itself,
    keyed by its message id as it always was. A message of many events is split into
    ``Part``s keyed ``<message id>:<index>`` (``stages.parts``): each bad event is
    dead-lettered alone and the others go on, and the message is deleted once all of them
    are resolved. Its decoded weight (events, bytes) is reported to ``leases``, so the
    in-flight caps count rows and bytes, not only messages.
    """

    def __init__(
        self,
        inbox: asyncio.Queue,
        sink: asyncio.Queue,
        acker: asyncio.Queue,
        masker: Masker,
        stats: Any,
        max_receive_count: int,
        *,
        decoding: Decoding = Decoding(),
        leases: Any = None,
        workers: Any = None,
    ) -> None:
        self.inbox, self.sink, self.acker = inbox, sink, acker
        self.workers = workers  # a ``stages.offload.TransformPool``: big messages transformed in other processes
        self.masker = masker
        self.stats = stats
        self.max_receive_count = max_receive_count
        self.decoding = decoding
        self.leases = leases

    async def run(self) -> None:
        """Batches in order; with transform workers, a few batches are under way at once to keep them busy."""
        depth = 4 * self.workers.workers if self.workers is not None else 1
        under_way: deque[tuple[list, Any]] = deque()
        try:
            while True:
                if under_way and (len(under_way) >= depth or self.inbox.empty()):
                    await self._finish(*under_way.popleft())
                    continue
                batch = await self.inbox.get()
                if batch is None:
                    while under_way:
                        await self._finish(*under_way.popleft())
                    await self.sink.put(None)
                    return
                under_way.append(self._start(batch))
        finally:
            if self.workers is not None:
                self.workers.close()

    def _start(self, batch: list[dict]) -> tuple[list[tuple[dict, tuple, Any]], Any]:
        """Check each message's origin and receive count, then transform it, or send it to the workers.

        Returns, in message order, ``(msg, args, outcome or None)`` (``None``: the workers have it),
        and the future of the workers' outcomes: one call per batch, so a worker never waits for
        this process to hand it the next message.
        """
        masker, how, max_rc, auth = self.masker, self.decoding, self.max_receive_count, self.masker.origin_auth
        offload = self.workers.wants if self.workers is not None else None
        outcomes: list[tuple[dict, tuple, Any]] = []
        sent_off: list[tuple] = []
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
            except Rejected as exc:
                outcomes.append((msg, (), Reject(exc.rule, exc.reason)))
                continue
            # authenticated: keep the original's id and date
            mid, sent = origin(msg) if redriven else (msg["MessageId"], int(attrs.get("SentTimestamp", 0)))
            args = (msg["Body"], msg.get("MessageAttributes"), mid, sent, redriven)
            if offload is not None and offload(args[0]):
                sent_off.append(args)
                outcomes.append((msg, args, None))
            else:
                outcomes.append((msg, args, transform_message(*args, masker, how)))
        sent = self.workers.submit(sent_off) if sent_off else None  # type: ignore[union-attr]
        if sent is None:  # no worker could take them: transform them here
            outcomes = [(m, a, transform_message(*a, masker, how) if o is None else o) for m, a, o in outcomes]
        return outcomes, sent

    async def _finish(self, outcomes: list[tuple[dict, tuple, Any]], sent: tuple[int, Any] | None) -> None:
        """Merge a batch's outcomes in message order (a FIFO group's dead letters leave in order); hand them on."""
        weigh = self.leases.weigh if self.leases is not None else None
        rows: list[tuple] = []
        items: list = []
        dead: list[tuple[Any, str, str]] = []
        done: Any = iter(())
        if sent is not None:
            generation, future = sent
            try:
                done = iter(await future)
            except (BrokenProcessPool, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # this task is being cancelled; a future cancelled under it is a lost batch
                if self.workers.reset(generation):  # type: ignore[union-attr]
                    events.transform_workers_failed(self.stats)
                done = iter([transform_message(*a, self.masker, self.decoding) for _, a, o in outcomes if o is None])
        for msg, args, out in outcomes:
            if out is None:
                out = next(done)
            match out:
                case One(row, decoded):
                    rows.append(row)
                    items.append(msg)
                    if weigh is not None and (decoded or len(msg["Body"]) >= LONG_BODY_BYTES):
                        weigh(msg["ReceiptHandle"], 1, decoded)  # long bodies were estimated on arrival
                case Many(n, decoded, got, indexes, bad):
                    if weigh is not None:
                        weigh(msg["ReceiptHandle"], n, decoded)
                    group = Group(msg, n, (self.decoding, args[4]))
                    rows += got
                    items += [Part(group, i, row[0], None) for i, row in zip(indexes, got)]
                    for i, text, rule, reason in bad:
                        dead.append((Part(group, i, f"{args[2]}:{i}", text), rule, reason))
                case Reject(rule, reason):
                    dead.append((msg, rule, reason))
                case _:
                    assert_never(out)
        if dead:
            await self.acker.put(DeadLetter(dead))
        if rows:
            await self.sink.put((rows, items))
