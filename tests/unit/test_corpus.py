"""The hostile corpus against the pure transform (the e2e test runs it through SQS and PostgreSQL)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from stages.masking import Masker, generate_key
from stages.transform import COLUMNS, ORIGIN_ATTRIBUTES, Rejected, origin, to_row
from tests.e2e.corpus import BAD, ODD, UNSENDABLE, Bad, Odd

MASKER = Masker([generate_key("c1")])


def test_corpus_is_big_and_names_are_unique() -> None:
    names = [c.name for c in [*BAD, *ODD]]
    assert len(names) == len(set(names)) and len(names) >= 40


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.name)
def test_bad_body_is_rejected_with_its_rule(case: Bad) -> None:
    with pytest.raises(Rejected) as info:
        to_row(case.body, "m-1", 0, MASKER)
    assert info.value.rule == case.rule
    if case.reason:
        assert info.value.reason == case.reason


@pytest.mark.parametrize("case", ODD, ids=lambda c: c.name)
def test_odd_body_is_stored_as_sent(case: Odd) -> None:
    row = dict(zip(COLUMNS, to_row(case.body, "m-1", 0, MASKER)))
    event = orjson.loads(case.body)
    assert row["user_id"] == event["user_id"] and row["locale"] == event.get("locale")
    assert MASKER.unmask(row["masked_device_id"]) == event["device_id"]
    for column, value in case.stored.items():
        got = MASKER.unmask(row["masked_" + column]) if column in ("ip", "device_id") else row[column]
        assert got == value, column


@pytest.mark.parametrize("body", UNSENDABLE)
def test_raw_control_characters_are_rejected_too(body: str) -> None:
    """SQS refuses these bodies; should another transport deliver them, they are still rejected."""
    with pytest.raises(Rejected) as info:
        to_row(body, "m-1", 0, MASKER)
    assert info.value.rule == "body.json"


attribute = st.fixed_dictionaries({"DataType": st.sampled_from(["String", "Number"]), "StringValue": st.text(max_size=20)})


@settings(max_examples=300)
@given(
    st.sampled_from([c.body for c in [*BAD, *ODD] if len(c.body) < 5000]),
    st.integers(0, 400), st.text(max_size=12),
    st.dictionaries(st.sampled_from([*ORIGIN_ATTRIBUTES, "other"]), attribute, max_size=3),
)
def test_fuzz_spliced_corpus_only_ever_rejects(body: str, at: int, splice: str, attrs: dict) -> None:
    """Random text spliced into corpus bodies, with arbitrary (redrive) attributes: a row or a rejection."""
    msg = {"MessageId": "m-1", "Body": body[:at] + splice + body[at:], "Attributes": {"SentTimestamp": "0"}}
    if attrs:
        msg["MessageAttributes"] = attrs
    mid, sent = origin(msg)
    try:
        row = to_row(msg["Body"], mid, sent, MASKER)
    except Rejected:
        return
    assert len(row) == len(COLUMNS)


@pytest.mark.parametrize(("attrs", "expected"), [
    ({}, ("m-1", 5)),
    ({"origin_message_id": {"StringValue": "orig"}, "origin_sent_timestamp": {"StringValue": "86400000"}}, ("orig", 86_400_000)),
    ({"origin_sent_timestamp": {"StringValue": "²"}}, ("m-1", 5)),  # isdigit() but not a number int() takes
    ({"origin_sent_timestamp": {"StringValue": "9" * 40}}, ("m-1", 5)),  # beyond any date
    ({"origin_message_id": {"StringValue": ""}}, ("m-1", 5)),
])
def test_origin_of_a_redriven_message(attrs: dict, expected: tuple) -> None:
    msg = {"MessageId": "m-1", "Attributes": {"SentTimestamp": "5"}, "MessageAttributes": attrs}
    assert origin(msg) == expected
