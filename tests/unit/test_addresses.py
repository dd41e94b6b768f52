"""The C fast path of ``normalise_ip`` spells every address exactly as ``ipaddress`` does, and rejects the same."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings, strategies as st

from stages.addresses import _slow, normalise_ip

_WORD = st.sampled_from([0, 0, 0, 1, 0xF, 0xFF, 0xFFFF, 0x1234, 0xABCD])


def _outcome(fn, text: str) -> str:
    try:
        return fn(text)
    except ValueError:
        return "rejected"


@settings(max_examples=2000)
@given(st.lists(_WORD, min_size=8, max_size=8), st.sampled_from(["compressed", "exploded", "upper", "stripped"]))
def test_every_spelling_of_an_ipv6_address(words: list[int], spelling: str) -> None:
    n = 0
    for w in words:
        n = (n << 16) | w
    addr = ipaddress.IPv6Address(n)
    text = {"compressed": addr.compressed, "exploded": addr.exploded, "upper": addr.exploded.upper(),
            "stripped": ":".join(h.lstrip("0") or "0" for h in addr.exploded.split(":"))}[spelling]
    assert _outcome(normalise_ip, text) == _outcome(_slow, text)


@settings(max_examples=3000)
@given(st.text(alphabet="0123456789abcdefF:::...%", min_size=1, max_size=24))
def test_address_like_text(text: str) -> None:
    assert _outcome(normalise_ip, text) == _outcome(_slow, text)


def test_edge_cases() -> None:
    for text in ["::", "::1", "1::", "::1.2.3.4", "::ffff:1.2.3.4", "::ffff:0:1.2.3.4", "::0:1.2.3.4",
                 "64:ff9b::1.2.3.4", "1:2:3:4:5:6:1.2.3.4", "1:0:0:1:0:0:0:1", "1:0:0:0:1:0:0:1", "0:0:1::",
                 "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "00001::", "1::2::3", "fe80::1%eth0", "1:2:3:4:5:6:7:8:9",
                 " ::1", "::1 ", "::ffff:01.2.3.4", "1.2.3.4", "01.2.3.4", "1.2.3", "256.1.1.1", "0.0.0.0",
                 "1.2.3.04", "1.2.3.4 ", "2001:DB8::1"]:
        assert _outcome(normalise_ip, text) == _outcome(_slow, text), text
    assert normalise_ip("::ffff:1.2.3.4") == "1.2.3.4"
