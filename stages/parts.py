"""Events of a multi-event message, and when the message itself may go.

A message that carries many events is split by the transformer into ``Part``s, one per
event. Each part travels on its own (a row to the sink, or a dead letter to the acker), and
each is resolved on its own: committed, dead-lettered, or left for redelivery. The SQS
message may only be deleted once *every* part is resolved and none was left for
redelivery; otherwise deleting it would lose the events still in flight. That countdown
lives here, in ``Group`` and ``settle``, and nowhere else.

A single-event message is not split: it travels as its SQS message dict, exactly as before,
so the common case pays for none of this. Everything that handles outcomes therefore takes
an ``Item``, a message dict or a ``Part``, through ``source_of``, ``body_of`` and ``settle``.
"""

from __future__ import annotations

from typing import Iterable, Union

from .decode import BadEvent, Decoding, decode, event_json
from .message import origin

__all__ = ["Part", "Group", "Item", "source_of", "body_of", "key_of", "event_index", "log_id", "settle"]


class Group:
    """The countdown of one split message: parts not yet resolved, and whether one must come back."""

    __slots__ = ("msg", "left", "keep", "decoding", "events")

    def __init__(self, msg: dict, parts: int, decoding: tuple[Decoding, bool] | None = None) -> None:
        self.msg, self.left, self.keep = msg, parts, False
        self.decoding = decoding  # (how, redriven): how to find an event of it again (``body_of``)
        self.events: list | None = None  # decoded again once, if any of its rows is refused


class Part:
    """Event ``index`` of ``group.msg``; ``key`` is its row key (``<message id>:<index>``).

    ``event`` is the event's text for a bad event (the body of its dead letter), and ``None``
    for a stored one: its JSON is needed only if the database refuses its row, which is rare, so
    it is found again then by decoding the message once more (decoding is deterministic).
    """

    __slots__ = ("group", "index", "key", "event")

    def __init__(self, group: Group, index: int, key: str, event: str | None) -> None:
        self.group, self.index, self.key, self.event = group, index, key, event

    @property
    def msg(self) -> dict:
        return self.group.msg

    def __repr__(self) -> str:  # never the event: it holds PII
        return f"Part(key={self.key!r})"


Item = Union[dict, Part]


def source_of(item: Item) -> dict:
    """The SQS message an item came in (its receipt handle, attributes, group)."""
    return item if type(item) is dict else item.group.msg  # type: ignore[union-attr]


def body_of(item: Item) -> str:
    """What a dead letter of ``item`` carries: the message's body, or the event's JSON alone."""
    if type(item) is dict:
        return item["Body"]  # type: ignore[index]
    event = item.event  # type: ignore[union-attr]
    if event is not None:
        return event
    group = item.group  # type: ignore[union-attr]
    if group.events is None:  # once per message, however many of its rows are refused
        how, redriven = group.decoding
        group.events = decode(group.msg["Body"], group.msg.get("MessageAttributes"), how, redriven=redriven)[0]
    event = group.events[item.index]  # type: ignore[union-attr]
    return event.text if type(event) is BadEvent else event_json(event)


def key_of(item: Item) -> str:
    """The event's identity: the message's (verified) origin id, plus ``:<index>`` for a part."""
    return origin(item)[0] if type(item) is dict else item.key  # type: ignore[arg-type, union-attr]


def event_index(item: Item) -> int | None:
    return None if type(item) is dict else item.index  # type: ignore[union-attr]


def log_id(item: Item) -> str:
    """The message id a log line names: the SQS message's own, with ``:<index>`` for one of its events."""
    if type(item) is dict:
        return item["MessageId"]  # type: ignore[index]
    return f"{item.group.msg['MessageId']}:{item.index}"  # type: ignore[union-attr]


def settle(items: Iterable[Item], *, keep: bool = False) -> tuple[list[dict], list[dict]]:
    """Resolve ``items``; return the messages now fully resolved: ``(to delete, to give back)``.

    ``keep``: these items were not stored nor dead-lettered, so their message must come back.
    A split message is returned once, with its last part; given back if any part was kept.
    """
    done: list[dict] = []
    back: list[dict] = []
    for item in items:
        if type(item) is dict:
            (back if keep else done).append(item)  # type: ignore[arg-type]
            continue
        group = item.group  # type: ignore[union-attr]
        group.left -= 1
        if keep:
            group.keep = True
        if group.left == 0:
            (back if group.keep else done).append(group.msg)
    return done, back
