"""Decoding bodies into events (envelope, encoding, framing): every shape, bad events, caps, properties."""

from __future__ import annotations

import base64
import gzip

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from pipeline.harness.shapes import SHAPES, UNDECODABLE_KINDS, Shape, encode, undecodable
from pipeline.sample import sample_bodies
from stages.decode import BadEvent, Decoding, Rejected, decode
from stages.masking import Masker, generate_key
from stages.transform import Rejected as TransformRejected, to_row
from tests.e2e.corpus import BAD, ODD

HOW = Decoding()
EVENTS = sample_bodies(7, seed=3)
MASKER = Masker([generate_key("d1")])


def rule_of(body: str, attrs: dict | None = None, how: Decoding = HOW, **kw: bool) -> str:
    with pytest.raises(Rejected) as info:
        decode(body, attrs, how, **kw)
    return info.value.rule


def test_rejected_is_one_class() -> None:
    assert TransformRejected is Rejected


@pytest.mark.parametrize("attribute", [False, True], ids=["detected", "attribute"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_shape_decodes_to_its_events(shape: Shape, attribute: bool) -> None:
    # CASE: envelope x encoding x framing (x gzip signalled by attribute or detected) -> exactly the events, in order
    events = EVENTS[:1] if shape.framing == "single" else EVENTS
    body, attrs = encode(events, shape, attribute=attribute)
    got, decoded = decode(body, attrs, HOW)
    assert got == [orjson.loads(e) for e in events]
    assert (decoded > 0) == shape.gzip


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=20))
event_st = st.dictionaries(st.text(min_size=1, max_size=8), json_scalar, min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(st.lists(event_st, min_size=2, max_size=20), st.sampled_from([s for s in SHAPES if s.framing != "single"]))
def test_property_batches_round_trip(events: list[dict], shape: Shape) -> None:
    # CASE: any list of objects, in any batch shape -> decoded to the same objects, in order (NUL-free ones)
    texts = [orjson.dumps(e).decode() for e in events]
    body, attrs = encode(texts, shape)
    got, _ = decode(body, attrs, HOW)
    for e, g in zip(events, got):
        if isinstance(g, BadEvent):
            assert g.rule == "body.nul" and any("\x00" in k or "\x00" in str(v) for k, v in e.items())
        else:
            assert g == e
    assert len(got) == len(events)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
                 st.binary(max_size=200).map(lambda b: base64.b64encode(gzip.compress(b)).decode()),
                 st.sampled_from([c.body for c in [*BAD, *ODD] if len(c.body) < 3000])),
       st.sampled_from(["auto", "none", "sns", "eventbridge"]),
       st.sampled_from([None, {"content-encoding": {"StringValue": "gzip"}}, {"content-encoding": {"StringValue": "br"}}]))
def test_property_decode_only_ever_returns_events_or_rejects(body: str, envelope: str, attrs: dict | None) -> None:
    # CASE: arbitrary text, base64, gzip, corpus bodies, any envelope mode and attribute -> events or Rejected, nothing else
    try:
        events, decoded = decode(body, attrs, Decoding(envelope=envelope, max_decoded_bytes=4096, max_events=50))
    except Rejected as exc:
        assert exc.rule and exc.reason
        return
    assert 1 <= len(events) <= 50 and 0 <= decoded <= 4096
    assert all(type(e) is dict or type(e) is BadEvent for e in events)
    if len(events) == 1:
        assert type(events[0]) is dict


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.name)
def test_a_plain_bad_body_is_rejected_whole_as_before(case) -> None:  # type: ignore[no-untyped-def]
    # CASE: every hostile body that was one bad event stays one whole-message rejection with the same rule
    try:
        events, _ = decode(case.body, None, HOW)
    except Rejected as exc:
        assert exc.rule == case.rule and (case.reason is None or exc.reason == case.reason)
        return
    assert len(events) == 1  # decodes to one event: validation (to_row's) rejects it, as before
    with pytest.raises(Rejected) as info:
        to_row(case.body, "m", 0, MASKER)
    assert info.value.rule == case.rule


@pytest.mark.parametrize("case", ODD, ids=lambda c: c.name)
def test_a_plain_odd_body_is_one_event(case) -> None:  # type: ignore[no-untyped-def]
    assert decode(case.body, None, HOW)[0] == [orjson.loads(case.body)]


def test_one_event_in_an_array_is_a_message_of_one_event() -> None:
    assert decode("[" + EVENTS[0] + "]", None, HOW)[0] == [orjson.loads(EVENTS[0])]


@pytest.mark.parametrize("framing", ["array", "ndjson"])
def test_bad_events_inside_a_batch_come_back_alone(framing: str) -> None:
    # CASE: not JSON, not an object, a NUL inside one event -> BadEvent at its index with its rule; others are events
    nul = orjson.dumps({**orjson.loads(EVENTS[1]), "note": "\x00"}).decode()
    body, _ = encode([EVENTS[0], "not json at all", "42", nul, EVENTS[2]], Shape("sns", True, framing))
    got, _ = decode(body, None, HOW)
    assert got[0] == orjson.loads(EVENTS[0]) and got[4] == orjson.loads(EVENTS[2])
    assert [g.rule for g in got[1:4]] == ["body.type" if framing == "array" else "body.json", "body.type", "body.nul"]
    assert got[2].text == "42" and orjson.loads(got[3].text)["note"] == "\x00"


@pytest.mark.parametrize("kind", UNDECODABLE_KINDS)
def test_undecodable_messages_are_rejected_whole(kind: str) -> None:
    body, rule = undecodable(kind)
    assert rule_of(body) == rule


def test_decompression_bomb_is_rejected_without_expanding_it() -> None:
    # CASE: 64 KiB of gzip that would expand to 50 MB, cap 1 MiB -> encoding.too_large
    bomb = base64.b64encode(gzip.compress(b"[" + b" " * 50_000_000 + b"]")).decode()
    assert len(bomb) < 100_000
    assert rule_of(bomb, how=Decoding(max_decoded_bytes=2**20)) == "encoding.too_large"
    # exactly at the cap is fine
    payload = ("[" + ",".join(EVENTS) + "]").encode()
    ok = base64.b64encode(gzip.compress(payload)).decode()
    assert len(decode(ok, None, Decoding(max_decoded_bytes=len(payload)))[0]) == len(EVENTS)
    assert rule_of(ok, how=Decoding(max_decoded_bytes=len(payload) - 1)) == "encoding.too_large"


@pytest.mark.parametrize("framing", ["array", "ndjson"])
def test_event_cap(framing: str) -> None:
    body, _ = encode(EVENTS, Shape("none", False, framing))
    assert len(decode(body, None, Decoding(max_events=len(EVENTS)))[0]) == len(EVENTS)
    assert rule_of(body, how=Decoding(max_events=len(EVENTS) - 1)) == "framing.too_many_events"


def test_required_envelope() -> None:
    # CASE: sqs.envelope = sns/eventbridge -> other bodies are rejected; a redriven (bare event) body is accepted
    sns, _ = encode(EVENTS[:1], Shape("sns", False, "single"))
    eb, _ = encode(EVENTS[:1], Shape("eventbridge", False, "single"))
    assert rule_of(EVENTS[0], how=Decoding(envelope="sns")) == "envelope.sns"
    assert rule_of(sns, how=Decoding(envelope="eventbridge")) == "envelope.eventbridge"
    assert decode(sns, None, Decoding(envelope="sns"))[0] == decode(eb, None, Decoding(envelope="eventbridge"))[0]
    assert decode(EVENTS[0], None, Decoding(envelope="sns"), redriven=True)[0] == [orjson.loads(EVENTS[0])]
    # none: an envelope is just a body (and not a login event)
    assert decode(sns, None, Decoding(envelope="none"))[0][0]["Type"] == "Notification"


def test_content_encoding_attribute() -> None:
    # CASE: content-encoding gzip on a JSON body -> not base64; another encoding -> unsupported; identity -> plain
    assert rule_of(EVENTS[0], {"content-encoding": {"StringValue": "gzip"}}) == "encoding.base64"
    assert rule_of(EVENTS[0], {"content-encoding": {"StringValue": "br"}}) == "encoding.unsupported"
    assert decode(EVENTS[0], {"content-encoding": {"StringValue": "identity"}}, HOW)[0] == [orjson.loads(EVENTS[0])]
    not_gzip = base64.b64encode(b"plain bytes").decode()
    assert rule_of(not_gzip, {"content-encoding": {"StringValue": "gzip"}}) == "encoding.gzip"


def test_reasons_never_carry_values() -> None:
    secret = "10.9.8.7"
    bodies = [f"H4sI{secret}", orjson.dumps({"Type": "Notification", "Message": {"ip": secret}}).decode(),
              "[" + secret + "]"]
    for body in bodies:
        with pytest.raises(Rejected) as info:
            decode(body, {"content-encoding": {"StringValue": secret}} if body[0] == "[" else None, HOW)
        assert secret not in info.value.reason
