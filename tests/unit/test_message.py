"""Origin identities: only a signature under a key of the ring lets a message pick its row id and date."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import pytest
from hypothesis import given, settings, strategies as st

from stages.masking import Masker, generate_key
from stages.message import (
    DEAD_LETTER_ATTRIBUTES, ORIGIN_ID, ORIGIN_SENT, ORIGIN_SIG, UNAUTHENTICATED, OriginAuth, origin,
)
from stages.transform import Transformer

K1, K2, K3 = generate_key("k1"), generate_key("k2"), generate_key("k3")
OLD, NEW = Masker([K1]), Masker([K2, K1], active="k2")
BODY = '{"user_id": "u", "device_type": "ios", "ip": "1.2.3.4", "device_id": "d", "app_version": "2.3.0"}'


def _msg(attrs: dict | None, body: str = BODY, mid: str = "own-id", sent: str = "1700000000000") -> dict:
    msg = {"MessageId": mid, "Body": body, "ReceiptHandle": "rh", "Attributes": {"SentTimestamp": sent}}
    if attrs is not None:
        msg["MessageAttributes"] = {k: {"DataType": "String", "StringValue": v} for k, v in attrs.items()}
    return msg


def _signed(auth: OriginAuth, mid: str = "orig-id", sent: str = "1600000000000", body: str = BODY) -> dict:
    return {ORIGIN_ID: mid, ORIGIN_SENT: sent, ORIGIN_SIG: auth.sign(mid, sent, body)}


def test_a_signed_origin_verifies_and_names_the_active_key() -> None:
    attrs = _signed(NEW.origin_auth)
    assert attrs[ORIGIN_SIG].startswith("k2.") and NEW.origin_auth.problem(_msg(attrs)) is None


def test_any_key_of_the_ring_verifies_and_a_key_that_left_the_ring_does_not() -> None:
    signed_old = _msg(_signed(OLD.origin_auth))
    assert NEW.origin_auth.problem(signed_old) is None  # k1 is still in the new ring: rotation keeps redrives valid
    assert "not in the key ring" in Masker([K2]).origin_auth.problem(signed_old)  # type: ignore[operator]


def test_the_mac_key_is_derived_not_the_aes_siv_key() -> None:
    sig = _signed(OLD.origin_auth)[ORIGIN_SIG].split(".", 1)[1]
    naive = hmac.new(K1.secret, b"anything", hashlib.sha256).digest()
    assert sig and OLD.origin_auth._keys["k1"] not in (K1.secret, K1.secret[:32], K1.secret[32:])
    assert len(OLD.origin_auth._keys["k1"]) == 32 and naive != OLD.origin_auth._keys["k1"]
    assert "secret" not in repr(OLD.origin_auth) and K1.encode().split(":")[1] not in repr(OLD.origin_auth)


@pytest.mark.parametrize(("attrs", "why"), [
    ({ORIGIN_ID: "orig-id", ORIGIN_SENT: "1600000000000"}, "without a signature"),
    ({ORIGIN_ID: "orig-id"}, "without a signature"),
    ({ORIGIN_SENT: "0"}, "without a signature"),
    ({ORIGIN_SIG: "k1.AAAA"}, "origin_message_id is missing"),
    ({ORIGIN_ID: "orig-id", ORIGIN_SENT: "0", ORIGIN_SIG: "no-dot"}, "malformed"),
    ({ORIGIN_ID: "orig-id", ORIGIN_SENT: "0", ORIGIN_SIG: "k1."}, "malformed"),
    ({ORIGIN_ID: "orig-id", ORIGIN_SENT: "0", ORIGIN_SIG: "k9.AAAA"}, "not in the key ring"),
    ({ORIGIN_ID: "orig-id", ORIGIN_SENT: "0", ORIGIN_SIG: "k1.AAAA"}, "does not match"),
    ({ORIGIN_ID: "orig-id", ORIGIN_SENT: "0", ORIGIN_SIG: "k1.ünïcödé"}, "does not match"),
    ({ORIGIN_ID: "orig-id", ORIGIN_SENT: "²", ORIGIN_SIG: "k1.AAAA"}, "not a send time"),
    ({ORIGIN_ID: "orig-id", ORIGIN_SENT: "9" * 40, ORIGIN_SIG: "k1.AAAA"}, "not a send time"),
    ({ORIGIN_ID: "", ORIGIN_SENT: "0", ORIGIN_SIG: "k1.AAAA"}, "origin_message_id is missing"),
])
def test_forged_or_malformed_origins_are_refused_with_a_reason_that_names_no_value(attrs: dict, why: str) -> None:
    problem = OLD.origin_auth.problem(_msg(attrs))
    assert problem is not None and why in problem
    assert "orig-id" not in problem and "AAAA" not in problem and "k9" not in problem


def test_a_signature_binds_id_time_body_and_key_id() -> None:
    good = _signed(OLD.origin_auth)
    auth = OLD.origin_auth
    assert auth.problem(_msg(good)) is None
    assert auth.problem(_msg(good, body=BODY.replace('"u"', '"v"'))) is not None  # another body
    assert auth.problem(_msg({**good, ORIGIN_ID: "other-id"})) is not None  # replayed under another id
    assert auth.problem(_msg({**good, ORIGIN_SENT: "0"})) is not None  # backdated
    assert auth.problem(_msg({**good, ORIGIN_SIG: "k2." + good[ORIGIN_SIG].split(".", 1)[1]})) is not None
    assert Masker([K3]).origin_auth.problem(_msg(good)) is not None  # another environment's key


def test_framing_is_unambiguous() -> None:
    """Moving bytes between fields never keeps a signature valid."""
    auth = OLD.origin_auth
    assert auth.sign("ab", "1", "c") != auth.sign("a", "1", "bc")
    assert auth.sign("a1", "1", "") != auth.sign("a", "11", "")


@settings(max_examples=200)
@given(st.text(min_size=1, max_size=40), st.integers(0, 10**13), st.text(max_size=200),
       st.text(min_size=1, max_size=40), st.integers(0, 10**13), st.text(max_size=200))
def test_property_a_signature_verifies_only_its_own_triple(mid: str, sent: int, body: str,
                                                           mid2: str, sent2: int, body2: str) -> None:
    auth = NEW.origin_auth
    attrs = {ORIGIN_ID: mid, ORIGIN_SENT: str(sent), ORIGIN_SIG: auth.sign(mid, sent, body)}
    assert auth.problem(_msg(attrs, body=body)) is None
    other = {ORIGIN_ID: mid2, ORIGIN_SENT: str(sent2), ORIGIN_SIG: attrs[ORIGIN_SIG]}
    assert (auth.problem(_msg(other, body=body2)) is None) == ((mid, sent, body) == (mid2, sent2, body2))


def test_sign_refuses_what_could_not_verify() -> None:
    for mid, sent in (("", "1"), ("m", "x"), ("m", "9" * 20)):
        with pytest.raises(ValueError):
            OLD.origin_auth.sign(mid, sent, BODY)


def test_dead_letter_and_origin_attribute_names_are_distinct() -> None:
    assert DEAD_LETTER_ATTRIBUTES.isdisjoint({ORIGIN_ID, ORIGIN_SENT, ORIGIN_SIG})


class _Stats:
    pass


def _transform(masker: Masker, msgs: list[dict]) -> tuple[list, list]:
    async def go() -> tuple[list, list]:
        inbox, sink, acker = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
        await inbox.put(msgs)
        await inbox.put(None)
        await Transformer(inbox, sink, acker, masker, _Stats(), max_receive_count=3).run()
        rows = [r for item in iter(sink.get_nowait, None) for r in item[0]]
        dead = [d for outcome in (acker.get_nowait() for _ in range(acker.qsize())) for d in outcome.entries]
        return rows, dead

    return asyncio.run(go())


def test_transformer_keeps_a_verified_identity() -> None:
    rows, dead = _transform(NEW, [_msg(_signed(OLD.origin_auth))])
    assert dead == [] and rows[0][0] == "orig-id" and str(rows[0][-1]) == "2020-09-13"


@pytest.mark.parametrize("forged", [
    {ORIGIN_ID: "victim-id", ORIGIN_SENT: "0"},  # no signature
    {ORIGIN_ID: "victim-id", ORIGIN_SENT: "0", ORIGIN_SIG: "k1.AAAA"},  # wrong signature
    {**_signed(OLD.origin_auth), ORIGIN_ID: "victim-id"},  # replayed with another id
    {**_signed(OLD.origin_auth), ORIGIN_SENT: "0"},  # backdated
    _signed(Masker([generate_key("k1")]).origin_auth),  # another ring's key under the same key id
])
def test_transformer_dead_letters_and_strips_an_unauthenticated_origin(forged: dict) -> None:
    msg = _msg({**forged, "other": "kept"})
    msg["Attributes"]["ApproximateReceiveCount"] = "99"  # checked before the poison check, too
    rows, dead = _transform(OLD, [msg])
    assert rows == [] and len(dead) == 1
    got, rule, reason = dead[0]
    assert rule == UNAUTHENTICATED and reason.startswith("origin: ") and "victim-id" not in reason
    assert set(got["MessageAttributes"]) == {"other"}  # nothing downstream can read the forged identity
    assert origin(got) == ("own-id", 1_700_000_000_000)  # what the acker writes as source_* for redrive
