"""Which identity redrive gives a dead letter: a table of notes, signatures and origins, without servers."""

from __future__ import annotations

import pytest

from pipeline.redrive import Notes, _identity
from stages.masking import Masker, generate_key, parse_key

AUTH = Masker([parse_key(generate_key("ring").encode())]).origin_auth
OTHER = Masker([parse_key(generate_key("ring").encode())]).origin_auth  # same key id, another key
BODY = '{"user_id": "u"}'


def dead(notes: dict[str, str] | None = None, body: str = BODY, origin: dict[str, str] | None = None) -> dict:
    attrs = {k: {"DataType": "String", "StringValue": v} for k, v in {**(notes or {}), **(origin or {})}.items()}
    return {"MessageId": "dlq-own", "Body": body, "Attributes": {"SentTimestamp": "1764201600000"},
            "MessageAttributes": attrs}


def noted(mid: str = "src", sent: str = "1700000000000", sig: str | None = None, index: str | None = None) -> dict:
    out = {"source_message_id": mid, "source_sent_timestamp": sent}
    if index is not None:
        out["source_event_index"] = index
    if sig is not None:
        out["source_signature"] = sig
    return out


OWN = ("dlq-own", "1764201600000")
CASES = [
    # CASE: the acker's signed note is promoted
    (dead(noted(sig=AUTH.sign("src", "1700000000000", BODY, note=True))), False, (Notes.SIGNED, "src", "1700000000000")),
    # CASE: the signed note of one event of a batch keeps its index
    (dead(noted(sig=AUTH.sign("src:4", "1700000000000", BODY, note=True), index="4")), False,
     (Notes.SIGNED, "src:4", "1700000000000")),
    # CASE: a signature moved to another index, another body, another time, or by another key: own identity
    (dead(noted(sig=AUTH.sign("src:4", "1700000000000", BODY, note=True), index="5")), False, (Notes.NOT_TRUSTED, *OWN)),
    (dead(noted(sig=AUTH.sign("src", "1700000000000", "{}", note=True))), False, (Notes.NOT_TRUSTED, *OWN)),
    (dead(noted(sent="0", sig=AUTH.sign("src", "1700000000000", BODY, note=True))), False, (Notes.NOT_TRUSTED, *OWN)),
    (dead(noted(sig=OTHER.sign("src", "1700000000000", BODY, note=True))), False, (Notes.NOT_TRUSTED, *OWN)),
    (dead(noted(sig="garbage")), False, (Notes.NOT_TRUSTED, *OWN)),
    # CASE: an origin_signature of the same identity and body is not a note's signature
    (dead(noted(sig=AUTH.sign("src", "1700000000000", BODY))), False, (Notes.NOT_TRUSTED, *OWN)),
    # CASE: an unsigned note (an older version's dead letter): own identity, unless the operator trusts it
    (dead(noted()), False, (Notes.NOT_TRUSTED, *OWN)),
    (dead(noted()), True, (Notes.UNSIGNED_TRUSTED, "src", "1700000000000")),
    # CASE: --trust-unsigned-notes never trusts a signature that fails
    (dead(noted(sig="garbage")), True, (Notes.NOT_TRUSTED, *OWN)),
    # CASE: no notes at all (an SQS redrive policy moved it): a verified origin, else its own identity
    (dead(origin={"origin_message_id": "orig", "origin_sent_timestamp": "1600000000000",
                  "origin_signature": AUTH.sign("orig", "1600000000000", BODY)}), False,
     (Notes.NONE, "orig", "1600000000000")),
    (dead(origin={"origin_message_id": "orig", "origin_sent_timestamp": "1600000000000"}), False, (Notes.NONE, *OWN)),
    # CASE: a note's signature is no origin_signature either
    (dead(origin={"origin_message_id": "orig", "origin_sent_timestamp": "1600000000000",
                  "origin_signature": AUTH.sign("orig", "1600000000000", BODY, note=True)}), False, (Notes.NONE, *OWN)),
    (dead(), False, (Notes.NONE, *OWN)),
]


@pytest.mark.parametrize(("msg", "trust_unsigned", "expected"), CASES)
def test_identity(msg: dict, trust_unsigned: bool, expected: tuple) -> None:
    assert _identity(msg, AUTH, trust_unsigned) == expected
