"""Heartbeat, release and the source's backoff against the in-memory SQS fake."""

from __future__ import annotations

import asyncio
import time

import pytest
from botocore.exceptions import EndpointConnectionError

from stages import backoff
from pipeline.clients import OTHER_CALLS
from stages import offload
from stages.acker import DEAD_LETTER_LANES
from stages.leases import LONG_BODY_BYTES, VISIBILITY_CALLS, Heartbeat, Leases, release
from stages.source import SqsSource
from stages.stats import Stats
from tests.sqs_fake import FakeSqs, client_error, failed_entry, message


async def test_heartbeat_extends_only_stale_leases() -> None:
    # CASE: leases older than half the timeout are extended (and their clock reset); fresh ones are not
    sqs, stats, leases = FakeSqs(), Stats(), Leases(100)
    leases.add([message(1), message(2)])
    leases.held["h-1"] = time.monotonic() - 100
    await Heartbeat(sqs, "q", leases, stats, 30).beat()
    assert sqs.handles("visibility") == ["h-1"] and stats.extended == 1
    assert time.monotonic() - leases.held["h-1"] < 5
    assert sqs.calls["visibility"][0]["Entries"][0]["VisibilityTimeout"] == 30


async def test_heartbeat_failure_is_counted_and_leaves_leases() -> None:
    # CASE: the extension call fails -> an sqs error is counted, the lease stays (retried next beat)
    sqs, stats, leases = FakeSqs().then("visibility", client_error("InternalError", status=500)), Stats(), Leases(100)
    leases.add([message(1)])
    leases.held["h-1"] = 0.0
    await Heartbeat(sqs, "q", leases, stats, 30).beat()
    assert stats.errors["sqs"] == 1 and stats.extended == 0 and "h-1" in leases.held


async def test_release_makes_everything_visible_and_counts_successes() -> None:
    # CASE: release -> visibility 0 in tens; only successful entries count as released; all leases dropped
    sqs = FakeSqs().then("visibility", {"Successful": [{"Id": str(i)} for i in range(9)],
                                        "Failed": [failed_entry("9", "ReceiptHandleIsInvalid", True)]})
    stats, leases = Stats(), Leases(100)
    leases.add([message(i) for i in range(15)])
    await release(sqs, "q", leases, stats)
    assert [len(c["Entries"]) for c in sqs.calls["visibility"]] == [10, 5]
    assert all(e["VisibilityTimeout"] == 0 for c in sqs.calls["visibility"] for e in c["Entries"])
    assert stats.released == 14 and len(leases) == 0


async def test_leases_reserve_waits_for_room() -> None:
    # CASE: the in-flight cap blocks reserve() until a drop makes room
    leases = Leases(10)
    leases.add([message(i) for i in range(5)])
    await leases.reserve(5)
    waiter = asyncio.create_task(leases.reserve(5))
    await asyncio.sleep(0)
    assert not waiter.done()
    leases.unreserve(5)
    await asyncio.wait_for(waiter, 1)


async def test_source_backs_off_on_failures_then_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    # CASE: receive fails -> last_poll_ok False, backoff grows per failure; a success resets both
    sleeps: list[int] = []
    monkeypatch.setattr(backoff, "delay", lambda attempt: sleeps.append(attempt) or 0.0)
    sqs = FakeSqs().then("receive", client_error("ServiceUnavailable", "ReceiveMessage", 503),
                         client_error("ServiceUnavailable", "ReceiveMessage", 503))
    sqs.inbox.append([message(1), message(2)])
    stats, leases, out = Stats(), Leases(100), asyncio.Queue()
    source = SqsSource(sqs, "q", out, leases, stats, receivers=1, wait_time_seconds=0)
    task = asyncio.create_task(source.run())
    batch = await asyncio.wait_for(out.get(), 5)
    source.stop(finish_calls=False)
    await asyncio.gather(task, return_exceptions=True)
    assert [m["MessageId"] for m in batch] == ["m-1", "m-2"]
    assert sleeps[:2] == [1, 2] and stats.errors["sqs"] == 2 and source.last_poll_ok
    assert set(leases.held) == {"h-1", "h-2"}
    assert "MessageGroupId" in sqs.calls["receive"][0]["MessageSystemAttributeNames"]


def test_the_sqs_pool_has_room_for_the_calls_beside_receives_and_deletes() -> None:
    assert OTHER_CALLS >= VISIBILITY_CALLS + DEAD_LETTER_LANES + 1


def test_the_estimated_bodies_are_the_ones_the_workers_take() -> None:
    assert LONG_BODY_BYTES == offload.MIN_BYTES


def test_short_bodies_count_one_row_whatever_the_estimate() -> None:
    # CASE: plain single events are never weighed: they must not carry the batches' rows per byte
    leases = Leases(100)
    leases.add([{"ReceiptHandle": "big", "Body": "x" * 10_000}])
    leases.weigh("big", 100, 0)
    leases.add([{"ReceiptHandle": f"s{i}", "Body": "x" * 300} for i in range(10)])
    assert leases.rows == 100 + 10


def test_an_arrival_weighs_the_rows_such_a_body_has_held() -> None:
    # CASE: nothing weighed yet (single events never are): a message counts one row
    leases = Leases(100, max_rows=1000)
    leases.add([{"ReceiptHandle": "a", "Body": "x" * 10_000}])
    assert leases.rows == 1
    # CASE: once 100-event bodies of 10 kB were decoded, the next such body counts about 100 rows on arrival,
    # so batches waiting to be decoded (in the transform workers) already count against the row cap
    leases.weigh("a", 100, 0)
    assert leases.rows == 100
    for i in range(20):
        leases.add([{"ReceiptHandle": f"w{i}", "Body": "x" * 10_000}])
        leases.weigh(f"w{i}", 100, 0)
    before = leases.rows
    leases.add([{"ReceiptHandle": "b", "Body": "x" * 10_000}])
    assert 90 <= leases.rows - before <= 100
    assert leases.full(1)  # 2,200 rows against a cap of 1,000: no more polling
    # CASE: weighing corrects the estimate, and dropping takes back what was counted
    leases.weigh("b", 3, 0)
    assert leases.rows == before + 3
    leases.drop(["b", "a", *[f"w{i}" for i in range(20)]])
    assert leases.rows == 0 and leases.bytes == 0


class HeldCalls:
    """Visibility calls that wait until ``hold`` are under way at once; with ``fail_first``, the first then fails
    and the others answer only after it has."""

    def __init__(self, hold: int, fail_first: bool = False) -> None:
        self.hold, self.fail_first = hold, fail_first
        self.now = self.peak = self.calls = 0
        self.all_in, self.first_failed = asyncio.Event(), asyncio.Event()

    async def change_message_visibility_batch(self, **request: object) -> dict:
        self.calls += 1
        if self.fail_first and self.calls == 1:
            await self.all_in.wait()
            self.first_failed.set()
            raise EndpointConnectionError(endpoint_url="http://sqs")
        self.now += 1
        self.peak = max(self.peak, self.now)
        if self.now >= self.hold:
            self.all_in.set()
        await self.all_in.wait()
        if self.fail_first:
            await self.first_failed.wait()
        self.now -= 1
        return {"Successful": [{"Id": e["Id"]} for e in request["Entries"]], "Failed": []}  # type: ignore[attr-defined]


async def test_visibility_calls_run_side_by_side() -> None:
    # CASE: 500 leases -> 50 calls, VISIBILITY_CALLS at once (at a 50 ms round trip, one after another took 2.5 s)
    sqs, stats, leases = HeldCalls(VISIBILITY_CALLS), Stats(), Leases(1000)
    leases.add([message(i) for i in range(500)])
    await asyncio.wait_for(release(sqs, "q", leases, stats), 10)
    assert sqs.peak == VISIBILITY_CALLS and sqs.calls == 50 and stats.released == 500


async def test_a_failed_visibility_call_skips_the_calls_not_yet_started() -> None:
    # CASE: SQS out of reach -> one failure counted, not one per ten leases; the calls under way finish
    sqs, stats, leases = HeldCalls(VISIBILITY_CALLS - 1, fail_first=True), Stats(), Leases(1000)
    leases.add([message(i) for i in range(500)])
    await asyncio.wait_for(release(sqs, "q", leases, stats), 10)
    assert stats.errors["sqs"] == 1 and sqs.calls == VISIBILITY_CALLS and stats.released == 10 * (VISIBILITY_CALLS - 1)
