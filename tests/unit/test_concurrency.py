"""The adaptive concurrency limiter, driven by a simulated server on a manual clock (no sleeping, no timing asserts)."""

from __future__ import annotations

import asyncio

import pytest

from stages.concurrency import Limiter, tracked
from stages.stats import Stats


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def rounds(lim: Limiter, clock: Clock, n: int, *, base_rtt: float, capacity: float = 1e9,
                 items: int = 10, failed: bool = False) -> list[int]:
    """``n`` rounds of a server with round trip ``base_rtt`` serving at most ``capacity`` calls/s:
    every slot is used (demand is unlimited), so each round is ``limit`` calls finishing together."""
    seen = []
    for _ in range(n):
        k = lim.limit
        for _ in range(k):
            await lim.acquire()
        rtt = max(base_rtt, k / capacity)  # past the server's capacity, calls only queue
        clock.now += rtt
        for _ in range(k):
            lim.observe(rtt, items, failed=failed)
            lim.release()
        seen.append(lim.limit)
    return seen


async def test_grows_fast_under_added_latency_while_calls_come_back_full() -> None:
    # CASE: 50 ms round trips, every receive brings 10 messages: 8 -> 128 within about a second (Lambda-like)
    clock = Clock()
    lim = Limiter("receive", start=8, maximum=128, clock=clock, call_size=10)
    seen = await rounds(lim, clock, 40, base_rtt=0.05)
    assert seen[-1] == 128 and seen == sorted(seen)  # only ever up
    assert (seen.index(128) + 1) * 0.05 <= 1.0, seen  # simulated time: 4 doublings, a window of >= 0.1 s each


async def test_does_not_grow_when_more_concurrency_adds_no_throughput() -> None:
    # CASE: loopback: the broker serves 400 calls/s whatever the concurrency; round trips only queue.
    # Growth stops one step past where calls queue for over HEADROOM base round trips, and a step
    # further is a probe of one window, taken back
    clock = Clock()
    lim = Limiter("receive", start=8, maximum=128, clock=clock, call_size=10)
    seen = await rounds(lim, clock, 400, base_rtt=0.001, capacity=400)
    assert max(seen) <= 32 and lim.limit == 16, seen  # probes never compound
    assert seen.count(32) < len(seen) / 10  # at 16 nearly all the time: one probe per hold, not one per window


async def test_grows_while_growth_pays_and_stops_where_it_stops_paying() -> None:
    # CASE: 50 ms round trips and a broker saturated at 32 calls in flight (640 calls/s): the doubling
    # reaches 64 (RTT twice the base: tolerated), the step to 128 (four times) is taken back
    clock = Clock()
    lim = Limiter("receive", start=8, maximum=128, clock=clock, call_size=10)
    seen = await rounds(lim, clock, 400, base_rtt=0.05, capacity=640)
    assert seen[-100:].count(64) >= 80 and seen.count(128) < len(seen) / 10, seen  # 128: probes only
    assert seen.index(64) * 0.05 <= 1.0, seen  # the ramp to where it pays is as fast as before


async def test_probes_again_after_the_hold() -> None:
    # CASE: the broker was saturated, then gets faster (capacity x 10): after the hold the limit grows again
    clock = Clock()
    lim = Limiter("receive", start=8, maximum=128, clock=clock, call_size=10)
    await rounds(lim, clock, 200, base_rtt=0.01, capacity=800)
    assert lim.limit <= 16
    await rounds(lim, clock, 2000, base_rtt=0.01, capacity=8000)
    assert lim.limit >= 64


async def test_deletes_may_always_grow_to_the_receive_limit() -> None:
    # CASE: acks keep up with receives: on a saturated broker deletes still grow (on demand) to the receive
    # limit they follow, and no further; without it they stop where calls queue (one step from the start)
    for follows, expected in ((Limiter("receive", start=64, pinned=64), 64), (None, 16)):
        clock = Clock()
        lim = Limiter("delete", start=8, maximum=128, clock=clock)
        lim.follows = follows
        seen = await rounds(lim, clock, 300, base_rtt=0.001, capacity=400)
        assert seen[-100:].count(expected) >= 80 and max(seen) <= 2 * expected, seen  # past it: probes only


async def test_partial_receives_do_not_grow_it_and_drift_it_back() -> None:
    # CASE: calls bring 2 of 10 messages (supply below demand): more calls would not find more
    clock = Clock()
    lim = Limiter("receive", start=8, maximum=128, clock=clock, call_size=10)
    await rounds(lim, clock, 40, base_rtt=0.05)
    assert lim.limit == 128
    await rounds(lim, clock, 200, base_rtt=0.05, items=2)
    assert lim.limit == 8
    await rounds(lim, clock, 100, base_rtt=0.05, items=5)  # half full: neither grows nor drifts
    assert lim.limit == 8


async def test_no_growth_past_the_room_downstream() -> None:
    # CASE: what the calls would bring does not fit under the in-flight cap: growth stops at the room
    clock = Clock()
    lim = Limiter("receive", start=4, maximum=128, clock=clock, call_size=10, room=lambda n: n * 10 <= 400)
    seen = await rounds(lim, clock, 100, base_rtt=0.05)
    assert max(seen) <= 40 and lim.limit >= 20


async def test_grows_to_its_maximum_and_never_past_it() -> None:
    # CASE: a server with unlimited capacity: the limit climbs to its maximum and stays there
    clock = Clock()
    lim = Limiter("delete", start=4, maximum=40, clock=clock)
    seen = await rounds(lim, clock, 300, base_rtt=0.05)
    assert max(seen) == 40 and lim.limit == 40 and all(s <= 40 for s in seen)


async def test_shrinks_on_errors_down_to_its_minimum() -> None:
    # CASE: throttled calls cut the limit (multiplicatively) to the minimum, never below
    clock = Clock()
    lim = Limiter("receive", start=64, minimum=3, maximum=128, clock=clock)
    seen = await rounds(lim, clock, 200, base_rtt=0.05, failed=True)
    assert seen[0] <= 64 and lim.limit == 3 and min(seen) == 3
    assert seen == sorted(seen, reverse=True)  # only ever down


async def test_shrinks_when_downstream_is_full_and_grows_back_after() -> None:
    # CASE: the stages behind report no room -> smaller; room again -> it climbs back (slow start to the old high)
    clock = Clock()
    lim = Limiter("receive", start=8, maximum=64, clock=clock)
    await rounds(lim, clock, 100, base_rtt=0.05)
    high = lim.limit
    for _ in range(40):
        lim.congested()
        await rounds(lim, clock, 1, base_rtt=0.05)
    assert lim.limit < high / 4
    await rounds(lim, clock, 200, base_rtt=0.05)
    assert lim.limit >= high / 2


async def test_idle_receives_drift_back_to_the_start() -> None:
    # CASE: empty long polls (no messages) carry no signal: the limit returns to where it started
    clock = Clock()
    lim = Limiter("receive", start=8, maximum=128, clock=clock)
    await rounds(lim, clock, 100, base_rtt=0.05)
    assert lim.limit > 8
    await rounds(lim, clock, 100, base_rtt=0.05, items=0)
    assert lim.limit == 8


async def one_at_a_time(lim: Limiter, clock: Clock, n: int) -> None:
    """``n`` full calls of 50 ms, each alone: demand never reaches the limit."""
    for _ in range(n):
        await lim.acquire()
        clock.now += 0.05
        lim.observe(0.05, 10)
        lim.release()


async def test_no_demand_no_growth() -> None:
    # CASE: calls never fill the limit (demand below it): nothing to learn, the limit stays
    clock = Clock()
    lim = Limiter("delete", start=16, maximum=128, clock=clock)
    await one_at_a_time(lim, clock, 200)
    assert lim.limit == 16


async def test_pinned_never_moves_and_admits_at_most_its_number() -> None:
    # CASE: a pinned limit ignores errors, congestion and latency; a call past it waits for a release
    clock = Clock()
    lim = Limiter("receive", start=8, minimum=1, maximum=128, pinned=5, clock=clock)
    seen = await rounds(lim, clock, 50, base_rtt=0.05)
    lim.congested()
    seen += await rounds(lim, clock, 50, base_rtt=0.05, failed=True)
    assert set(seen) == {5}
    for _ in range(5):
        await lim.acquire()
    sixth = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    assert not sixth.done() and lim.in_use == 5
    lim.release()
    await asyncio.wait_for(sixth, 1)
    assert lim.in_use == 5


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    # CASE: a receiver cancelled while waiting for a permit (shutdown) leaves the count right
    lim = Limiter("receive", start=1, pinned=1)
    await lim.acquire()
    waiter = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    lim.release()
    assert lim.in_use == 0
    await asyncio.wait_for(lim.acquire(), 1)
    # cancelled, and a release passes over it before it runs (shutdown while slots free up)
    late = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    late.cancel()
    lim.release()
    await asyncio.gather(late, return_exceptions=True)
    assert lim.in_use == 0 and not lim._waiters


@pytest.mark.parametrize("setting", [7, None])
async def test_tracked_limits_show_in_stats(setting: int | None) -> None:
    # CASE: the current limit is what /metrics and the progress line read (stats.concurrency[op])
    stats, clock = Stats(), Clock()
    lim = tracked("delete", stats, setting if setting is not None else Limiter("delete", start=4, maximum=64, clock=clock))
    assert stats.concurrency["delete"] == lim.limit
    await rounds(lim, clock, 60, base_rtt=0.05)
    assert stats.concurrency["delete"] == lim.limit == (7 if setting else lim.limit)
    if setting is None:
        assert lim.limit > 4


async def test_idle_permits_drift_it_back_to_the_start() -> None:
    # CASE: deletes grew while acks waited for permits; then one call at a time: the unused permits go
    clock = Clock()
    lim = Limiter("delete", start=16, maximum=128, clock=clock)
    await rounds(lim, clock, 40, base_rtt=0.05)
    assert lim.limit == 128
    await one_at_a_time(lim, clock, 400)
    assert lim.limit == 16
