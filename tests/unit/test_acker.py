"""The acker's branches against the in-memory SQS fake: every outcome, partial failures, attempt limits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stages import acker as acker_mod
from stages import backoff
from stages.acker import Acker, Committed, DeadLetter, Redeliver
from stages.leases import Leases
from stages.stats import Stats
from tests.sqs_fake import FakeSqs, client_error, failed_entry, message


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff, "delay", lambda attempt: 0.0)


async def run_acker(sqs: FakeSqs, outcomes: list[Any], *, queue: str = "q", concurrency: int = 2,
                    held: list[dict] | None = None) -> tuple[Acker, Stats, Leases]:
    stats, leases, inbox = Stats(), Leases(10_000), asyncio.Queue()
    leases.add(held if held is not None else [m for o in outcomes for m in _msgs(o)])
    acker = Acker(sqs, queue, "dlq", inbox, leases, stats, concurrency)
    for o in outcomes:
        inbox.put_nowait(o)
    inbox.put_nowait(None)
    await asyncio.wait_for(acker.run(), 10)
    return acker, stats, leases


def _msgs(outcome: Any) -> list[dict]:
    match outcome:
        case Committed(msgs) | Redeliver(msgs):
            return msgs
        case DeadLetter(entries):
            return [m for m, _, _ in entries]
    raise AssertionError(outcome)


def dead(*idx: int, **kw: Any) -> DeadLetter:
    return DeadLetter([(message(i, "bad", **kw), "body.json", "body: not valid JSON") for i in idx])


async def test_committed_are_deleted_in_tens() -> None:
    # CASE: Committed -> DeleteMessageBatch in calls of at most 10; leases dropped; acked counted
    sqs = FakeSqs()
    _, stats, leases = await run_acker(sqs, [Committed([message(i) for i in range(25)])])
    assert [len(c["Entries"]) for c in sqs.calls["delete"]] == [10, 10, 5]
    assert stats.acked == 25 and len(leases) == 0


async def test_redeliver_drops_leases_without_a_call() -> None:
    # CASE: Redeliver -> no SQS call, the lease is dropped (the visibility timeout brings it back)
    sqs = FakeSqs()
    _, stats, leases = await run_acker(sqs, [Redeliver([message(1), message(2)])])
    assert not sqs.calls and len(leases) == 0 and stats.acked == 0


async def test_transient_delete_entry_is_retried() -> None:
    # CASE: one entry fails transiently -> only that entry is retried, then succeeds
    sqs = FakeSqs().then("delete", {"Successful": [{"Id": "0"}], "Failed": [failed_entry("1", "InternalError")]})
    _, stats, leases = await run_acker(sqs, [Committed([message(0), message(1)])])
    assert sqs.handles("delete") == ["h-0", "h-1", "h-1"]
    assert stats.acked == 2 and stats.ack_failures == 1 and len(leases) == 0


async def test_permanent_delete_entry_is_not_retried() -> None:
    # CASE: ReceiptHandleIsInvalid -> given up at once (the message comes back and is deduplicated)
    sqs = FakeSqs().then("delete", {"Successful": [], "Failed": [failed_entry("0", "ReceiptHandleIsInvalid", True)]})
    _, stats, leases = await run_acker(sqs, [Committed([message(0)])])
    assert len(sqs.calls["delete"]) == 1 and stats.acked == 0 and stats.ack_failures == 1 and len(leases) == 0


async def test_delete_entry_gives_up_after_attempt_limit() -> None:
    # CASE: an entry that fails transiently on every call is given up after ENTRY_ATTEMPTS calls
    always = {"Successful": [], "Failed": [failed_entry("0", "InternalError")]}
    sqs = FakeSqs().then("delete", *[always] * 20)
    _, stats, leases = await run_acker(sqs, [Committed([message(0)])])
    assert len(sqs.calls["delete"]) == acker_mod.ENTRY_ATTEMPTS and len(leases) == 0


async def test_throttled_delete_call_is_retried() -> None:
    # CASE: the whole call is throttled -> retried with backoff, then succeeds
    sqs = FakeSqs().then("delete", client_error("ThrottlingException", "DeleteMessageBatch"))
    _, stats, _ = await run_acker(sqs, [Committed([message(0)])])
    assert len(sqs.calls["delete"]) == 2 and stats.acked == 1 and stats.errors["sqs"] == 1


async def test_delete_on_a_deleted_queue_is_not_retried() -> None:
    # CASE: the source queue is gone -> a permanent error; no retry loop, the leases are dropped
    sqs = FakeSqs().then("delete", client_error("AWS.SimpleQueueService.NonExistentQueue", "DeleteMessageBatch"))
    _, stats, leases = await run_acker(sqs, [Committed([message(0)])])
    assert len(sqs.calls["delete"]) == 1 and stats.acked == 0 and len(leases) == 0


async def test_dead_letter_is_sent_then_deleted() -> None:
    # CASE: DeadLetter -> SendMessageBatch to the DLQ with reason attributes, then the source delete
    sqs = FakeSqs()
    acker, stats, leases = await run_acker(sqs, [dead(1, 2)])
    sent = sqs.calls["send"][0]
    assert sent["QueueUrl"] == "dlq" and [e["MessageBody"] for e in sent["Entries"]] == ["bad", "bad"]
    assert sent["Entries"][0]["MessageAttributes"]["rule"]["StringValue"] == "body.json"
    assert "MessageGroupId" not in sent["Entries"][0]
    assert sqs.handles("delete") == ["h-1", "h-2"] and stats.rejected == 2 and not acker.refused


async def test_dead_letter_refused_per_entry_is_left_on_the_source() -> None:
    # CASE: the DLQ refuses one entry for good (too large) -> not deleted, counted by code, lease dropped
    sqs = FakeSqs().then("send", {"Successful": [{"Id": "0"}],
                                  "Failed": [failed_entry("1", "InvalidParameterValue", True)]})
    acker, stats, leases = await run_acker(sqs, [dead(1, 2)])
    assert sqs.handles("delete") == ["h-1"]
    assert acker.refused == {"m-2": "InvalidParameterValue"}
    assert stats.dead_letters_refused == {"InvalidParameterValue": 1} and stats.rejected == 1 and len(leases) == 0


async def test_dead_letter_call_refused_for_good_is_not_retried() -> None:
    # CASE: the DLQ is gone -> the whole call is refused once, never retried, nothing deleted
    sqs = FakeSqs().then("send", client_error("AWS.SimpleQueueService.NonExistentQueue"))
    acker, stats, leases = await run_acker(sqs, [dead(1, 2, 3)])
    assert len(sqs.calls["send"]) == 1 and not sqs.calls["delete"]
    assert set(acker.refused) == {"m-1", "m-2", "m-3"} and len(leases) == 0


async def test_transient_dead_letter_failure_gives_up_after_attempt_limit() -> None:
    # CASE: the DLQ keeps failing transiently -> bounded attempts, then the message is given back
    sqs = FakeSqs().then("send", *[client_error("ServiceUnavailable", status=503)] * 20)
    acker, stats, leases = await run_acker(sqs, [dead(1)])
    assert len(sqs.calls["send"]) == acker_mod.DEAD_LETTER_ATTEMPTS and not sqs.calls["delete"]
    assert stats.dead_letter_retries_exhausted == 1 and not acker.refused and len(leases) == 0


async def test_transient_dead_letter_entry_is_retried_alone() -> None:
    # CASE: one entry of the DLQ batch is throttled -> only it is resent, then both are deleted
    sqs = FakeSqs().then("send", {"Successful": [{"Id": "0"}], "Failed": [failed_entry("1", "InternalError")]})
    _, stats, _ = await run_acker(sqs, [dead(1, 2)])
    assert [[e["Id"] for e in c["Entries"]] for c in sqs.calls["send"]] == [["0", "1"], ["1"]]
    assert sorted(sqs.handles("delete")) == ["h-1", "h-2"] and stats.rejected == 2


async def test_a_stalled_dlq_never_blocks_deletes() -> None:
    # CASE: dead-letter sends hang -> committed messages are still deleted meanwhile (separate capacity)
    release = asyncio.Event()

    async def hang(request: dict) -> dict:
        await release.wait()
        return {"Successful": [{"Id": e["Id"]} for e in request["Entries"]], "Failed": []}

    sqs = FakeSqs().then("send", *[hang] * 10)
    stats, leases, inbox = Stats(), Leases(10_000), asyncio.Queue()
    acker = Acker(sqs, "q", "dlq", inbox, leases, stats, 1)
    committed = [message(100 + i) for i in range(50)]
    leases.add(committed)
    task = asyncio.create_task(acker.run())
    for i in range(10):
        inbox.put_nowait(dead(i))
    inbox.put_nowait(Committed(committed))
    for _ in range(200):
        if stats.acked == 50:
            break
        await asyncio.sleep(0.01)
    assert stats.acked == 50 and stats.rejected == 0
    release.set()
    inbox.put_nowait(None)
    await asyncio.wait_for(task, 5)
    assert stats.rejected == 10


async def test_fifo_dead_letters_keep_their_group_and_order() -> None:
    # CASE: FIFO source -> MessageGroupId kept, a deduplication id set, a group's letters sent in order
    sqs = FakeSqs()
    outcomes = [DeadLetter([(message(i, "bad", group=f"g{i % 2}"), "r", "why") for i in range(6)])]
    await run_acker(sqs, outcomes, queue="https://sqs/1/q.fifo")
    entries = [e for c in sqs.calls["send"] for e in c["Entries"]]
    for g in ("g0", "g1"):
        bodies = [e for e in entries if e["MessageGroupId"] == g]
        ids = [e["MessageAttributes"]["source_message_id"]["StringValue"] for e in bodies]
        assert ids == sorted(ids, key=lambda s: int(s.split("-")[1]))
    assert all(len(e["MessageDeduplicationId"]) == 64 for e in entries)
    assert len({e["MessageDeduplicationId"] for e in entries}) == 6
