"""The one backoff policy: exponential from 0.2 s, capped at 10 s, with jitter.

Every retry loop uses it (SQS receives, deletes and dead letters, database writes), so an
outage is met the same way everywhere and the policy is tuned in one place.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["delay", "wait", "INITIAL_S", "MAX_S"]

INITIAL_S = 0.2
MAX_S = 10.0
_JITTER = 0.5  # up to half the delay is random, so instances that failed together retry apart


def delay(attempt: int, initial: float = INITIAL_S, cap: float = MAX_S, jitter: float = _JITTER) -> float:
    """Seconds to sleep after failed attempt number ``attempt`` (1-based): doubling from ``initial`` up to ``cap``.

    ``jitter`` is the random share taken off; 0 for a lone actor (a supervisor restarting its worker).
    """
    base = min(cap, initial * 2 ** min(attempt - 1, 16))
    return base * (1 - jitter * random.random()) if jitter else base


def wait(retry_state: Any) -> float:
    """``delay`` as a tenacity ``wait`` callable."""
    return delay(retry_state.attempt_number)
