"""Validation contract, normalisation and row shape of the transform's pure core."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from pipeline.sample import MALFORMED, WRONG_TYPE, sample_bodies
from stages.masking import Masker, generate_key
from stages.transform import COLUMNS, Rejected, normalise_ip, to_row

MASKER = Masker([generate_key("t1")])
SENT = 1_764_201_600_000  # 2025-11-27T00:00:00Z
GOOD = {
    "user_id": "424cdd21-063a-43a7-b91b-7ca1a833afae",
    "app_version": "2.3.0",
    "device_type": "android",
    "ip": "199.172.111.135",
    "locale": "RU",
    "device_id": "593-47-5928",
}


def row(event: object, sent: int = SENT) -> tuple:
    return to_row(orjson.dumps(event), "m-1", sent, MASKER)


def rule_of(body: str | bytes) -> str:
    with pytest.raises(Rejected) as info:
        to_row(body, "m-1", SENT, MASKER)
    return info.value.rule


def test_takehome_event_becomes_a_masked_row() -> None:
    r = dict(zip(COLUMNS, row(GOOD)))
    assert r["message_id"] == "m-1"
    assert r["user_id"] == GOOD["user_id"]
    assert r["app_version"] == "2.3.0"
    assert r["locale"] == "RU"
    assert r["create_date"] == dt.date(2025, 11, 27)
    assert MASKER.unmask(r["masked_ip"]) == "199.172.111.135"
    assert MASKER.unmask(r["masked_device_id"]) == "593-47-5928"
    assert "199.172" not in r["masked_ip"] and "593-47" not in r["masked_device_id"]


@pytest.mark.parametrize("version", ["2.3.0", "0.96", "3.7", "2.00", "10", "1.2.3.4.5"])
def test_app_version_is_kept_exactly(version: str) -> None:
    assert row({**GOOD, "app_version": version})[COLUMNS.index("app_version")] == version


@pytest.mark.parametrize("locale", [None, "RU", ""])
def test_locale_is_optional(locale: str | None) -> None:
    assert row({**GOOD, "locale": locale})[COLUMNS.index("locale")] == locale
    without = {k: v for k, v in GOOD.items() if k != "locale"}
    assert row(without)[COLUMNS.index("locale")] is None


def test_unknown_fields_are_ignored() -> None:
    assert row({**GOOD, "extra": {"nested": [1, 2]}})[1] == GOOD["user_id"]


def test_create_date_is_utc_day_of_sent_timestamp() -> None:
    assert row(GOOD, SENT - 1)[COLUMNS.index("create_date")] == dt.date(2025, 11, 26)


@pytest.mark.parametrize(
    ("spellings"),
    [
        ["2001:db8::1", "2001:DB8:0:0:0:0:0:1", "2001:0db8:0000::0001"],
        ["1.2.3.4", "::ffff:1.2.3.4", "::FFFF:0102:0304"],
    ],
)
def test_ip_spellings_mask_the_same(spellings: list[str]) -> None:
    masks = {row({**GOOD, "ip": s})[COLUMNS.index("masked_ip")] for s in spellings}
    assert len(masks) == 1
    assert normalise_ip(spellings[1]) == spellings[0].lower()


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ("not json", "body.json"),
        ("", "body.json"),
        ('{"a": 1', "body.json"),
        ("[1, 2]", "body.type"),
        ('"a string"', "body.type"),
        ("null", "body.type"),
        ("42", "body.type"),
        (WRONG_TYPE, "body.not_login_event"),
        ("[" * 5000 + "]" * 5000, "body.json"),
    ],
)
def test_bodies_that_are_not_objects(body: str, rule: str) -> None:
    assert rule_of(body) == rule


@pytest.mark.parametrize("field", ["user_id", "device_type", "ip", "device_id", "app_version"])
def test_required_fields(field: str) -> None:
    missing = {k: v for k, v in GOOD.items() if k != field}
    assert rule_of(orjson.dumps(missing)) == f"{field}.missing"
    assert rule_of(orjson.dumps({**GOOD, field: None})) == f"{field}.missing"
    assert rule_of(orjson.dumps({**GOOD, field: ""})) == f"{field}.empty"
    assert rule_of(orjson.dumps({**GOOD, field: 123})) == f"{field}.type"
    assert rule_of(orjson.dumps({**GOOD, field: ["x"]})) == f"{field}.type"
    assert rule_of(orjson.dumps({**GOOD, field: "x\x00y"})) in (f"{field}.nul", "body.nul")


@pytest.mark.parametrize(("field", "limit"), [("user_id", 128), ("device_type", 32), ("device_id", 256), ("app_version", 32)])
def test_length_limits(field: str, limit: int) -> None:
    ok = "1" * limit if field == "app_version" else "x" * limit
    assert row({**GOOD, field: ok})
    assert rule_of(orjson.dumps({**GOOD, field: ok + "1"})) == f"{field}.too_long"


@pytest.mark.parametrize("ip", ["300.1.2.3", "1.2.3", "01.2.3.4", "1.2.3.4 ", "::g", "localhost", "1.2.3.4/24"])
def test_invalid_ips(ip: str) -> None:
    assert rule_of(orjson.dumps({**GOOD, "ip": ip})) == "ip.invalid"


@pytest.mark.parametrize("version", ["v2", "2.", ".2", "2..3", "2.3-beta", "١٢", " 2.3"])
def test_invalid_versions(version: str) -> None:
    assert rule_of(orjson.dumps({**GOOD, "app_version": version})) == "app_version.format"


def test_locale_rules() -> None:
    assert rule_of(orjson.dumps({**GOOD, "locale": 5})) == "locale.type"
    assert rule_of(orjson.dumps({**GOOD, "locale": "x" * 33})) == "locale.too_long"


def test_nul_anywhere_is_rejected() -> None:
    assert rule_of(orjson.dumps({**GOOD, "extra": "a\x00b"})) == "body.nul"
    # An escaped backslash followed by "u0000" is not a NUL.
    assert row({**GOOD, "extra": "\\u0000"})


def test_reasons_never_contain_values() -> None:
    for body in [*MALFORMED, orjson.dumps({**GOOD, "ip": "199.172.111.999"}).decode(),
                 orjson.dumps({**GOOD, "device_id": "593-47-5928" * 30}).decode()]:
        with pytest.raises(Rejected) as info:
            to_row(body, "m", SENT, MASKER)
        assert "199.172" not in info.value.reason and "593-47" not in info.value.reason


def test_sample_is_valid_and_malformed_is_not() -> None:
    for body in sample_bodies(200, seed=1):
        assert to_row(body, "m", SENT, MASKER)
    for body in MALFORMED:
        with pytest.raises(Rejected):
            to_row(body, "m", SENT, MASKER)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    json_values.map(lambda v: orjson.dumps(v)),
    st.fixed_dictionaries({k: st.one_of(st.just(v), json_values) for k, v in GOOD.items()}).map(orjson.dumps),
))
def test_fuzz_only_ever_rejects(body: bytes | str) -> None:
    try:
        r = to_row(body, "m", SENT, MASKER)
    except Rejected:
        return
    assert len(r) == len(COLUMNS)


_FIELD_VALUES = st.one_of(
    st.none(), st.integers(), st.booleans(), st.lists(st.integers(), max_size=2),
    st.text(max_size=40), st.text(max_size=300), st.sampled_from(["", "\x00", "2.3.0", "2.3.0\x00", "v2", "1..2",
                                                                  "10.0.0.1", "::1", "0.1.2.3", "1.2.3.04"]),
)


@settings(max_examples=400)
@given(st.dictionaries(st.sampled_from(["user_id", "device_type", "ip", "device_id", "app_version", "locale", "x"]),
                       _FIELD_VALUES), st.booleans())
def test_fast_and_checked_paths_agree(event: dict, fill: bool) -> None:
    """``event_row``'s one-expression fast path accepts exactly what the rule-by-rule path does."""
    from stages.transform import _checked_row, event_row

    if fill:  # mostly-valid events, one field at a time off, exercise the fast path's edges
        event = {**GOOD, **event}

    def outcome(fn):
        try:
            return fn(event, "m-1", 1_700_000_000_000, MASKER)
        except Rejected as exc:
            return exc.rule

    assert outcome(event_row) == outcome(_checked_row)
