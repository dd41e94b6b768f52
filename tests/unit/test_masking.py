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


@pytest.mark.parametrize("text", ["", "nokey", "k1:!!!", "k1:" + "QUFB", "bad id!:" + K1.encode().split(":")[1]])
def test_malformed_keys(text: str) -> None:
    with pytest.raises(KeyError_):
        parse_key(text)


def test_key_repr_hides_secret() -> None:
    assert K1.encode().split(":")[1] not in repr(K1)
