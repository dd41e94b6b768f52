"""Remembered tokens and normalised ips are exactly what computing them afresh gives, and stay bounded."""

from __future__ import annotations

import pytest

import stages.addresses as addresses
import stages.masking as masking
import stages.transform as transform
from stages.masking import Masker, generate_key

KEY = generate_key("m1")


def test_a_remembered_token_is_the_token_and_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(masking, "_MEMO_SIZE", 4)
    memo, fresh = Masker([KEY]), Masker([KEY])
    values = [f"10.0.0.{i}" for i in range(10)] * 3
    for v in values:
        token = memo.mask(v)
        assert token == Masker([KEY]).mask(v) and memo.unmask(token) == v
        assert len(memo._memo) <= 4
    assert [memo.mask(v) for v in values] == [fresh.mask(v) for v in values]


def test_a_memo_belongs_to_its_key() -> None:
    a, b = Masker([KEY]), Masker([generate_key("m2")])
    assert a.mask("1.2.3.4") != b.mask("1.2.3.4") and b.mask("1.2.3.4").startswith("m2.")


def test_normalised_ips_are_remembered_but_bad_ones_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(addresses, "_memo", {})
    assert transform.normalise_ip("::ffff:1.2.3.4") == "1.2.3.4"
    assert transform.normalise_ip("::ffff:1.2.3.4") == "1.2.3.4"  # from the memo
    assert transform.normalise_ip("2001:DB8::1") == "2001:db8::1"
    with pytest.raises(ValueError):
        transform.normalise_ip("300.1.2.3")
    assert "300.1.2.3" not in addresses._memo
