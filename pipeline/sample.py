"""Login events shaped like the takehome's, and malformed bodies to go with them.

Used to seed the embedded default, by ``loadgen`` and by the tests. Deterministic for a
given seed. Values repeat on purpose (shared devices, NAT'd IPs) so that masked
duplicates are visible to analysts.
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from typing import Iterator

import orjson

__all__ = ["WRONG_TYPE", "MALFORMED", "login_event", "sample_bodies", "iter_bodies"]

WRONG_TYPE = '{"foo": "oops_wrong_msg_type", "bar": "123"}'

# A few bodies that must be dead-lettered, one per kind of mistake.
MALFORMED = [
    "not json at all",
    '["a", "json", "array"]',
    '{"user_id": "u-1", "device_type": "ios", "ip": "300.1.2.3", "device_id": "123-45-6789", "app_version": "1.0"}',
    '{"user_id": "u-2", "device_type": "ios", "ip": "10.0.0.1", "app_version": "1.0"}',
    '{"user_id": "u-3", "device_type": "android", "ip": "10.0.0.2", "device_id": 12345, "app_version": "2.3.0"}',
    '{"user_id": "u-4", "device_type": "android", "ip": "10.0.0.3", "device_id": "111-22-3333", "app_version": "v2"}',
]

_DEVICE_TYPES = ("android", "ios")
_LOCALES = (None, None, None, "RU", "PH", "ID", "US", "DE", "BR", "FR")
_VERSIONS = ("2.3.0", "0.96", "3.7", "2.00", "2.2.1", "0.2.6", "5.0.4", "4.46")


def login_event(rng: random.Random, ips: list[str], devices: list[str]) -> dict:
    return {
        "user_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "app_version": rng.choice(_VERSIONS),
        "device_type": rng.choice(_DEVICE_TYPES),
        "ip": rng.choice(ips),
        "locale": rng.choice(_LOCALES),
        "device_id": rng.choice(devices),
    }


def iter_bodies(
    n: int, seed: int = 0, *, invalid_ratio: float = 0.0, duplicate_ratio: float = 0.0,
) -> Iterator[tuple[str, str]]:
    """``n`` message bodies as ``(kind, body)``, kind ``valid``, ``invalid`` or ``duplicate``.

    An ``invalid_ratio`` share are bad bodies (the wrong-type message and the malformed
    ones); a ``duplicate_ratio`` share repeat a recent valid body verbatim, i.e. the same
    event sent twice by its producer. Lazy, so ``loadgen`` never holds millions of bodies.
    """
    rng = random.Random(seed)
    pool = min(max(4, n // 3), 100_000)
    ips = [".".join(str(rng.randint(1, 254)) for _ in range(4)) for _ in range(pool)]
    ips += [f"2001:db8::{rng.randint(1, 0xFFFF):x}" for _ in range(max(1, pool // 10))]
    devices = [f"{rng.randint(100, 999)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}" for _ in range(pool)]
    bad = [WRONG_TYPE, *MALFORMED]
    recent: deque[str] = deque(maxlen=1000)
    for _ in range(n):
        if invalid_ratio and rng.random() < invalid_ratio:
            yield "invalid", rng.choice(bad)
        elif duplicate_ratio and recent and rng.random() < duplicate_ratio:
            yield "duplicate", recent[rng.randrange(len(recent))]
        else:
            body = orjson.dumps(login_event(rng, ips, devices)).decode()
            if duplicate_ratio:
                recent.append(body)
            yield "valid", body


def sample_bodies(n: int, seed: int = 0, *, invalid_ratio: float = 0.0, duplicate_ratio: float = 0.0) -> list[str]:
    """``n`` valid login events; with the ratios, that share replaced by bad or repeated bodies."""
    return [body for _, body in iter_bodies(n, seed, invalid_ratio=invalid_ratio, duplicate_ratio=duplicate_ratio)]
