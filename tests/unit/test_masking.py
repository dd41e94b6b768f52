"""Masking: deterministic, injective, keyed, reversible, with a key id for rotation."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from stages.masking import KeyError_, Masker, generate_key, parse_key

K1 = generate_key("k1")
K2 = generate_key("k2")
M1 = Masker([K1])

values = st.text(min_size=1, max_size=256).filter(lambda s: "\x00" not in s)


@given(values)
def test_deterministic(v: str) -> None:
    assert M1.mask(v) == M1.mask(v) == Masker([parse_key(K1.encode())]).mask(v)


@given(values, values)
def test_injective(a: str, b: str) -> None:
    if a != b:
        assert M1.mask(a) != M1.mask(b)


@given(values)
def test_round_trip(v: str) -> None:
    assert M1.unmask(M1.mask(v)) == v


@given(values)
def test_keyed(v: str) -> None:
    assert Masker([K2]).mask(v).split(".", 1)[1] != M1.mask(v).split(".", 1)[1]


def test_token_carries_key_id_and_no_plaintext() -> None:
    token = M1.mask("199.172.111.135")
    assert token.startswith("k1.")
    assert "199" not in token.split(".", 1)[1] or len(token) > 20
    assert Masker.key_id_of(token) == "k1"


def test_unmask_with_a_ring_of_two_keys() -> None:
    old, new = Masker([K1]), Masker([K2, K1], active="k2")
    assert new.unmask(old.mask("593-47-5928")) == "593-47-5928"
    assert new.mask("x").startswith("k2.")


def test_unmask_without_the_key_names_the_missing_id() -> None:
    with pytest.raises(KeyError_, match="'k1'"):
        Masker([K2]).unmask(M1.mask("1.2.3.4"))


def test_tampered_token_is_refused() -> None:
    token = M1.mask("1.2.3.4")
    bad = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    with pytest.raises(KeyError_):
        M1.unmask(bad)


@pytest.mark.parametrize("text", ["", "nokey", "k1:!!!", "k1:" + "QUFB", "bad id!:" + K1.encode().split(":")[1]],
                         ids=["empty", "nokey", "bad-base64", "short", "bad-id"])  # fixed ids: K1 is random
def test_malformed_keys(text: str) -> None:
    with pytest.raises(KeyError_):
        parse_key(text)


def test_key_repr_hides_secret() -> None:
    assert K1.encode().split(":")[1] not in repr(K1)


# --- one spelling per token ------------------------------------------------------------------

_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _lenient(b64: str) -> bytes:
    """What a forgiving decoder (the old one) reads: padding added, spare bits ignored."""
    import base64

    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))


def test_every_other_spelling_of_the_last_character_is_refused_as_forged() -> None:
    token = M1.mask("198.51.100.7")  # 12 + 16 bytes: the last character carries 4 spare bits
    body = token.split(".", 1)[1]
    twins = [token[:-1] + c for c in _B64URL if c != token[-1] and _lenient(body[:-1] + c) == _lenient(body)]
    assert len(twins) == 15  # what a lenient decoder would have accepted as the same value
    for twin in twins:
        with pytest.raises(KeyError_, match=r"^value does not decrypt under key 'k1' \(corrupt or forged\)$"):
            M1.unmask(twin)
    assert M1.unmask(token) == "198.51.100.7"


def test_padding_whitespace_and_other_alphabets_are_refused_as_forged() -> None:
    token = next(t for t in (M1.mask(f"10.0.0.{i}") for i in range(100)) if "-" in t[3:] or "_" in t[3:])
    body = token[3:]
    other_alphabet = "k1." + body.replace("-", "+").replace("_", "/")
    too_long = token + "A" * ((1 - len(body)) % 4 or 4)  # a length no base64 string can have
    variants = [token + "=", token + "==", token + " ", token + "\n", "\t" + token, "k1. " + body,
                token[:10] + " " + token[10:], other_alphabet, token + "!", token + "é", too_long]
    for bad in variants:
        if bad.startswith("\t"):  # whitespace before the key id makes it another key id
            with pytest.raises(KeyError_, match="no key with id"):
                M1.unmask(bad)
            continue
        with pytest.raises(KeyError_, match=r"^value does not decrypt under key 'k1' \(corrupt or forged\)$"):
            M1.unmask(bad)
    assert len(too_long[3:]) % 4 == 1
