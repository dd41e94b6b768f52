"""One dependency's outage, shared by every caller: while it is unreachable, one call per backoff step goes.

Callers that back off each on their own clock turn one outage into N failed calls per step (N
connection attempts, N warnings: 16 receivers and 30 delete batches made ~300 in a 10 s cut),
and meet a recovering server with N calls at once. Here the first transport failure (no
response at all) marks the dependency down. From then on ``admit`` lets one call through per
backoff step, a probe, and holds the others. Any response, even an error, proves the server
reachable and lets everyone through.

Calls already under way when it went down fail too; they carry the ticket they were admitted
with (the outage's epoch and step), so they do not step the backoff further (one outage is one
piece of news, however many calls bring it), and one that fails only after recovery does not
start a new outage. A probe that hangs or is cancelled holds no token: the next step admits
another. Errors with a response (throttling, a refused request) are the callers' own business:
their limiter and their own backoff handle them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from . import backoff, events
from .stats import Stats

__all__ = ["Outage", "Ticket"]

Ticket = tuple[int, int]  # (epoch, step) a call was admitted at: which news its failure can be


class Outage:
    def __init__(self, dependency: str, stats: Stats, *, unanswered: Callable[[BaseException], bool],
                 delay: Callable[[int], float] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.dependency, self.stats = dependency, stats
        self._unanswered = unanswered  # the dependency's classifier: which failures got no response at all
        self.step = 0  # probes failed in a row (the first failure counts one); 0: reachable
        self._epoch = 0  # bumped by each recovery: calls admitted before it say nothing about now
        self._delay = delay or (lambda step: backoff.delay(step))  # the one policy, looked up when used
        self._clock = clock
        self._since = 0.0  # when it went down
        self._next = 0.0  # when the next probe may go
        self._up: asyncio.Future[None] | None = None  # resolved by the first response

    @property
    def down(self) -> bool:
        return self.step > 0

    async def admit(self) -> Ticket:
        """Return once this caller may call: at once while reachable, else as the step's one probe or after a response.

        The result is the ticket to hand to ``failed`` if the call fails in transport.
        """
        while self.step:
            wait = self._next - self._clock()
            if wait <= 0:
                # This caller is the probe. The next one waits a step even if this one hangs.
                self._next = self._clock() + self._delay(self.step)
                return self._epoch, self.step
            if self._up is None:
                self._up = asyncio.get_running_loop().create_future()
            await asyncio.wait((self._up,), timeout=wait)
        return self._epoch, 0

    def settled(self, ticket: Ticket, exc: BaseException | None = None) -> bool:
        """How a call admitted with ``ticket`` ended; True if it got no response (the outage paces its retry).

        Anything else (a result, or an error the dependency answered with) proves it reachable.
        """
        if exc is not None and self._unanswered(exc):
            self.failed(ticket)
            return True
        if self.step:
            self.answered()
        return False

    def failed(self, ticket: Ticket) -> None:
        """A call admitted with ``ticket`` got no response; only the current step's news moves the backoff."""
        if ticket != (self._epoch, self.step):
            return
        now = self._clock()
        if not self.step:
            self._since = now
            events.dependency_unreachable(self.stats, self.dependency)
        self.step += 1
        self._next = now + self._delay(self.step)

    def answered(self) -> None:
        """A call got a response (of any kind): the dependency is reachable, everyone may call."""
        if not self.step:
            return
        events.dependency_reachable(self.stats, self.dependency, self._clock() - self._since, self.step - 1)
        self.step = 0
        self._epoch += 1
        up, self._up = self._up, None
        if up is not None and not up.done():
            up.set_result(None)
