"""Keyed, deterministic, reversible masking of PII with AES-SIV (RFC 5297).

Why AES-SIV: it is deterministic by construction (the same plaintext under the same key
always gives the same ciphertext, so analysts can count duplicates and join on masked
columns), it is a real cipher (whoever holds the key can recover the value), and without
the key the small input spaces (2^32 IPv4 addresses, 10^9 device ids) cannot be enumerated
the way an unkeyed hash can.

A masked value is ``<key id>.<base64url(ciphertext)>``: the key id lets keys rotate, and
``unmask`` can pick the right key from a ring.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from .message import OriginAuth

__all__ = ["Masker", "MaskingKey", "KeyError_", "generate_key", "parse_key"]

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_KEY_BYTES = 64  # AES-256-SIV: two 256-bit keys
_b2a = binascii.b2a_base64  # base64.urlsafe_b64encode, without its Python-level calls
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_MEMO_SIZE = 1 << 14  # remembered tokens per masker: the hot values (~2.5 MB at most, memory stays flat)


class KeyError_(ValueError):
    """A key is malformed, or a masked value needs a key the ring does not hold."""


class MaskingKey:
    """One key of the ring: an id and the raw AES-SIV key."""

    __slots__ = ("key_id", "secret")

    def __init__(self, key_id: str, secret: bytes) -> None:
        if not _KEY_ID.fullmatch(key_id):
            raise KeyError_("masking key id must be 1-16 characters of [A-Za-z0-9_-]")
        if len(secret) not in (32, 48, 64):
            raise KeyError_("masking key must decode to 32, 48 or 64 bytes")
        self.key_id = key_id
        self.secret = secret

    def __repr__(self) -> str:  # never print the secret
        return f"MaskingKey({self.key_id!r}, <redacted>)"

    def encode(self) -> str:
        return f"{self.key_id}:{base64.urlsafe_b64encode(self.secret).decode()}"


def parse_key(text: str) -> MaskingKey:
    """Parse ``<key id>:<base64url key>`` as printed by ``python -m pipeline keygen``."""
    key_id, sep, b64 = text.strip().partition(":")
    if not sep:
        raise KeyError_("masking key must look like '<key id>:<base64 key>' (see `python -m pipeline keygen`)")
    try:
        secret = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    except (binascii.Error, ValueError):
        raise KeyError_("masking key is not valid base64") from None
    return MaskingKey(key_id, secret)


def generate_key(key_id: str | None = None) -> MaskingKey:
    return MaskingKey(key_id or "k" + secrets.token_hex(3), os.urandom(_KEY_BYTES))


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _canonical_b64decode(text: str) -> bytes | None:
    """Unpadded base64url that re-encodes to exactly ``text``, else ``None``."""
    if len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == text else None


class Masker:
    """Masks with the active key; unmasks with any key of the ring.

    It also carries ``origin_auth``, the ring's origin signer (``stages.message``), so
    whoever holds the ring can authenticate redriven identities without a second key to manage.
    """

    __slots__ = ("active", "_prefix", "_encrypt", "_ciphers", "origin_auth", "_memo", "_active_key")

    def __init__(self, keys: list[MaskingKey], active: str | None = None) -> None:
        if not keys:
            raise KeyError_("no masking key configured")
        self._ciphers = {k.key_id: AESSIV(k.secret) for k in keys}
        if len(self._ciphers) != len(keys):
            raise KeyError_("masking key ids must be unique")
        self.active = active or keys[0].key_id
        if self.active not in self._ciphers:
            raise KeyError_(f"active masking key id {self.active!r} is not in the key ring")
        self._prefix = self.active + "."
        self._encrypt = self._ciphers[self.active].encrypt
        self._active_key = next(k for k in keys if k.key_id == self.active)
        self.origin_auth = OriginAuth(keys, self.active)
        self._memo: dict[str, str] = {}

    def active_key(self) -> MaskingKey:
        """The active key alone: all a transform worker needs (it masks; it never unmasks nor authenticates)."""
        return self._active_key

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    def mask(self, value: str) -> str:
        """The token of ``value``, remembered: the same ips and device ids come back event after event.

        AES-SIV is deterministic, so a remembered token is the one encryption would give; the
        memo is per masker (per active key) and small and bounded (cleared when full): it keeps
        only recent values, as short-lived as the bodies the process works on, and never leaves
        the process.
        """
        token = self._memo.get(value)
        if token is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            token = self._memo[value] = self._prefix + _b2a(self._encrypt(value.encode(), None), newline=False).translate(
                _URLSAFE).rstrip(b"=").decode()
        return token

    def unmask(self, token: str) -> str:
        """The original of ``token``; only the exact spelling ``mask`` produces is accepted.

        Nothing is stripped or repaired: a second spelling (spare bits in the last base64
        character, padding, whitespace, the ``+/`` alphabet) is refused like a forgery, so one
        value has one token and a token found in an audit or a ticket is the one in the table.
        """
        key_id, sep, b64 = token.partition(".")
        if not sep or not b64:
            raise KeyError_("not a masked value (expected '<key id>.<base64>')")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise KeyError_(f"no key with id {key_id!r} in the key ring")
        raw = _canonical_b64decode(b64)
        try:
            if raw is None:
                raise ValueError
            return cipher.decrypt(raw, None).decode()
        except (ValueError, InvalidTag):  # UnicodeDecodeError is a ValueError
            raise KeyError_(f"value does not decrypt under key {key_id!r} (corrupt or forged)") from None

    @staticmethod
    def key_id_of(token: str) -> str:
        return token.partition(".")[0]
