"""Canonical text of an IP address, so every spelling of one address masks to one token.

The answer must equal ``ipaddress``'s ``compressed`` form (IPv4-mapped IPv6 folded to IPv4):
tokens already in tables were made from it, and a second spelling of one address would split
its duplicates. ``ipaddress`` is slow, though (about 8 µs for an IPv6 address), and this runs
for every event. So the C parser (``inet_pton``/``inet_ntop``) answers whatever it provably
spells the same way, and ``ipaddress`` keeps the rest:

- a dotted quad that ``inet_ntop`` gives back unchanged is already canonical (leading zeros,
  short forms and the like are not, and go to ``ipaddress``, which also words the rejection);
- an IPv6 address is parsed by ``inet_pton``; ``inet_ntop`` then compresses the first longest
  run of two or more zero groups and writes lowercase hex without leading zeros, exactly as
  ``ipaddress`` does, except for addresses whose first 80 bits are zero (``::a.b.c.d``,
  ``::ffff:a.b.c.d``), which it writes with a dotted quad: those, and anything ``inet_pton``
  refuses (a scope ``%eth0``, say), go to ``ipaddress``.

``tests/unit/test_addresses.py`` checks the two paths agree on generated addresses of every
shape and on the edge cases.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["normalise_ip"]

_pton, _ntop, _V4, _V6 = socket.inet_pton, socket.inet_ntop, socket.AF_INET, socket.AF_INET6
_ZERO80 = bytes(10)
_memo: dict[str, str] = {}
_MEMO_SIZE = 1 << 12  # small: hot IPv6 addresses only (raw values, kept briefly)


def normalise_ip(text: str) -> str:
    """Canonical text of ``text``; ``ValueError`` if it is not an IPv4 or IPv6 address."""
    if ":" not in text:
        try:
            if _ntop(_V4, _pton(_V4, text)) == text:
                return text
        except (OSError, ValueError):  # not a plain dotted quad: ipaddress decides, and words the rejection
            pass
        return _slow(text)
    known = _memo.get(text)
    if known is None:
        if len(_memo) >= _MEMO_SIZE:
            _memo.clear()
        known = _memo[text] = _v6(text)
    return known


def _v6(text: str) -> str:
    try:
        packed = _pton(_V6, text)
    except (OSError, ValueError):
        return _slow(text)
    if packed[:10] == _ZERO80:  # inet_ntop may write these with a dotted quad; ipaddress folds or spells them
        return _slow(text)
    return _ntop(_V6, packed)


def _slow(text: str) -> str:
    addr = ipaddress.ip_address(text) if ":" not in text else ipaddress.IPv6Address(text)
    if addr.version == 6 and addr.ipv4_mapped is not None:  # type: ignore[union-attr]
        addr = addr.ipv4_mapped  # type: ignore[union-attr]
    return addr.compressed
