"""The message contract: which SQS message attributes mean something, and who may set them.

Two families of attributes cross the queues:

- **origin** (``origin_message_id``, ``origin_sent_timestamp``, ``origin_signature``): the
  identity of an event that ``python -m pipeline redrive`` put back. The transformer uses it
  as the row's ``message_id`` and ``create_date`` so a redriven event is stored once, under
  its original id and date. An identity decides what counts as a duplicate and which day a
  row belongs to, so it is a trust boundary: anyone who can send to the source queue could
  otherwise make distinct events collapse into one row (the rest deleted as duplicates) or
  backdate them. Only redrive holds the key ring, so only redrive can sign an identity, and
  the transformer dead-letters any origin attribute that does not authenticate.
- **dead letter** (``reason``, ``rule``, ``source_*``): what the acker writes on a DLQ entry;
  ``source_event_index`` marks the dead letter of one event of a multi-event message. The
  identity it notes (``source_message_id``, ``source_sent_timestamp``, the index) becomes a
  signed origin at the next redrive, so it is a trust boundary too: the acker signs it
  (``source_signature``, the same MAC over the identity and the dead letter's body), and
  redrive promotes only notes that verify. A producer that can send to the DLQ cannot choose
  the identity its message will be stored under.

The signature is HMAC-SHA-256 under a subkey derived with HKDF from each masking key (the
AES-SIV key bytes are never used for anything else), over the key id, the origin id, the
origin timestamp and the body, each length-prefixed so no two field tuples share an input.
It is ``<key id>.<base64url mac>``: any key of the ring verifies, redrive signs with the
active one, and a key that left the ring no longer authenticates anything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "ORIGIN_ID", "ORIGIN_SENT", "ORIGIN_SIG", "ORIGIN_ATTRIBUTES", "UNAUTHENTICATED",
    "DL_REASON", "DL_RULE", "DL_SOURCE_ID", "DL_SOURCE_SENT", "DL_SOURCE_QUEUE", "DL_SOURCE_EVENT_INDEX", "DL_SOURCE_SIG",
    "DEAD_LETTER_ATTRIBUTES", "CONTENT_ENCODING", "RECEIVED_ATTRIBUTES",
    "origin", "has_origin", "strip_origin", "valid_sent", "OriginAuth",
]


class _RingKey(Protocol):
    """A key of the masking ring (``stages.masking.MaskingKey``), as far as origin MACs need it."""

    key_id: str
    secret: bytes


# Set only by `python -m pipeline redrive` on a dead letter it puts back (the source asks for these).
ORIGIN_ID, ORIGIN_SENT, ORIGIN_SIG = "origin_message_id", "origin_sent_timestamp", "origin_signature"
ORIGIN_ATTRIBUTES = (ORIGIN_ID, ORIGIN_SENT, ORIGIN_SIG)
UNAUTHENTICATED = "origin.unauthenticated"  # the dead-letter rule for origin attributes that do not verify

# Set by the acker on every dead letter; they describe the rejection, not the event.
DL_REASON, DL_RULE, DL_SOURCE_QUEUE = "reason", "rule", "source_queue"
DL_SOURCE_ID, DL_SOURCE_SENT = "source_message_id", "source_sent_timestamp"
# On the dead letter of one event of a multi-event message: its index, so redrive restores `<source id>:<index>`.
DL_SOURCE_EVENT_INDEX = "source_event_index"
# The acker's MAC over the noted identity (``<source id>`` or ``<source id>:<index>``), time and body.
DL_SOURCE_SIG = "source_signature"
DEAD_LETTER_ATTRIBUTES = frozenset((DL_REASON, DL_RULE, DL_SOURCE_ID, DL_SOURCE_SENT, DL_SOURCE_QUEUE,
                                    DL_SOURCE_EVENT_INDEX, DL_SOURCE_SIG))

# Set by producers: `gzip` says the body (or SNS Message) is base64 of gzip data (stages.decode).
CONTENT_ENCODING = "content-encoding"
# The message attributes the source asks SQS for: nothing else is read.
RECEIVED_ATTRIBUTES = (*ORIGIN_ATTRIBUTES, CONTENT_ENCODING)

_NOTE_LABEL = b"dead-letter note"
_INFO = b"login-pipeline origin v1"  # HKDF context: these subkeys are for origin MACs and nothing else
_MAX_SENT_DIGITS = 14  # milliseconds until the year 5138: anything longer is not a date


def _value(attrs: dict, name: str) -> str | None:
    a = attrs.get(name)
    v = a.get("StringValue") if isinstance(a, dict) else None
    return v if isinstance(v, str) else None


def valid_sent(value: str | None) -> bool:
    """A send time in ms that ``int`` takes and that stays a date (``isdecimal``, not ``isdigit``: no '²')."""
    return bool(value) and value.isdecimal() and len(value) <= _MAX_SENT_DIGITS  # type: ignore[union-attr]


def origin(msg: dict) -> tuple[str, int]:
    """The event's identity: its message id and send time (ms), or the original's for a redriven message.

    The row key (``message_id``) and ``create_date`` then stay the same however often the
    event is redelivered or redriven, so it is stored once. This reads the attributes as
    they are: the transformer strips origin attributes that do not authenticate before
    anything calls it, so downstream (the acker's ``source_*`` notes, hence a later
    redrive) only ever sees a verified identity.
    """
    mid, sent = msg["MessageId"], (msg.get("Attributes") or {}).get("SentTimestamp", 0)
    attrs = msg.get("MessageAttributes")
    if attrs:
        o_id, o_sent = _value(attrs, ORIGIN_ID), _value(attrs, ORIGIN_SENT)
        if o_id:
            mid = o_id
        if valid_sent(o_sent):
            sent = o_sent
    return mid, int(sent)


def has_origin(msg: dict) -> bool:
    attrs = msg.get("MessageAttributes")
    return bool(attrs) and any(name in attrs for name in ORIGIN_ATTRIBUTES)


def strip_origin(msg: dict) -> None:
    """Forget the origin attributes of ``msg`` in place, so nothing downstream can read them."""
    attrs = msg.get("MessageAttributes")
    if attrs:
        for name in ORIGIN_ATTRIBUTES:
            attrs.pop(name, None)


def _frame(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">Q", len(f)) + f for f in fields)


def _utf8(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


class OriginAuth:
    """Signs and verifies origin identities with MAC subkeys of the masking key ring."""

    __slots__ = ("active", "_keys")

    def __init__(self, keys: list[_RingKey], active: str) -> None:
        self._keys = {
            k.key_id: HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(k.secret) for k in keys
        }
        self.active = active

    def __repr__(self) -> str:  # never print a subkey
        return f"OriginAuth(active={self.active!r}, key_ids={list(self._keys)!r})"

    def _mac(self, key_id: str, mid: str, sent: str, body: str | bytes, note: bool = False) -> str:
        fields = (key_id.encode(), _utf8(mid), sent.encode(), _utf8(body))
        # A dead letter's note is labelled: its signature is never a valid origin_signature (and the reverse).
        data = _frame(_NOTE_LABEL, *fields) if note else _frame(*fields)
        mac = hmac.new(self._keys[key_id], data, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def sign(self, mid: str, sent: str | int, body: str | bytes, *, note: bool = False) -> str:
        """``<key id>.<base64url HMAC>`` with the active key, for ``origin_signature`` (``source_signature``: ``note``)."""
        sent = str(sent)
        if not mid or not valid_sent(sent):
            raise ValueError("an origin needs a message id and a send time in milliseconds")
        return f"{self.active}.{self._mac(self.active, mid, sent, body, note)}"

    def problem(self, msg: dict) -> str | None:
        """Why the origin attributes of ``msg`` do not authenticate, or None if they do.

        The reason names what is wrong, never a value: it goes to the DLQ, logs and metrics.
        """
        attrs = msg.get("MessageAttributes") or {}
        mid, sent, sig = _value(attrs, ORIGIN_ID), _value(attrs, ORIGIN_SENT), _value(attrs, ORIGIN_SIG)
        if not sig:
            return "origin: identity attributes without a signature (only redrive may set an identity)"
        if not mid:
            return f"origin: {ORIGIN_ID} is missing or empty"
        if not valid_sent(sent):
            return f"origin: {ORIGIN_SENT} is not a send time in milliseconds"
        return self.mismatch(mid, sent, msg["Body"], sig, ORIGIN_SIG)  # type: ignore[arg-type]

    def mismatch(self, mid: str, sent: str, body: str | bytes, sig: str, name: str, *, note: bool = False) -> str | None:
        """Why ``sig`` (the attribute ``name``) does not sign this identity and body, or None if it does."""
        key_id, dot, given = sig.partition(".")
        if not dot or not given:
            return f"origin: {name} is malformed (expected '<key id>.<base64url>')"
        if key_id not in self._keys:
            return f"origin: {name} names a key id that is not in the key ring"
        expected = self._mac(key_id, mid, sent, body, note)
        if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass")):
            return f"origin: {name} does not match the identity and body"
        return None
