"""Multi-event messages through the transformer and the acker: split, dead-lettered alone, deleted last."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
import pytest

from pipeline.harness.shapes import Shape, encode
from pipeline.redrive import Notes, _identity
from pipeline.sample import sample_bodies
from stages import backoff
from stages.acker import Acker, Committed, DeadLetter, Redeliver
from stages.leases import Leases
from stages.masking import Masker, generate_key
from stages.parts import Part, body_of, settle
from stages.stats import Stats
from stages.transform import COLUMNS, Decoding, Transformer
from tests.sqs_fake import FakeSqs, failed_entry, message

MASKER = Masker([generate_key("p1")])
EVENTS = sample_bodies(5, seed=9)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff, "delay", lambda attempt: 0.0)


async def transform(batch: list[dict], leases: Leases | None = None, how: Decoding = Decoding()) -> tuple[list, list]:
    """(rows and items sent to the sink, dead letters sent to the acker)."""
    inbox, sink, acks = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
    inbox.put_nowait(batch)
    inbox.put_nowait(None)
    await Transformer(inbox, sink, acks, MASKER, Stats(), 5, decoding=how, leases=leases).run()
    out = []
    while (item := sink.get_nowait()) is not None:
        out += list(zip(*item))
    dead: list = []
    while not acks.empty():
        dead += acks.get_nowait().entries
    return out, dead


def batch_message(i: int, events: list[str], shape: Shape = Shape("none", False, "array"), **kw: Any) -> dict:
    body, attrs = encode(events, shape)
    msg = message(i, body, **kw)
    if attrs:
        msg["MessageAttributes"] = attrs
    return msg


async def test_a_message_of_many_events_is_split_and_keyed_by_index() -> None:
    # CASE: one single-event message and one batch of 5 with 2 bad events -> keys m-0, m-1:i; bad events alone
    bad = [EVENTS[0], "not json", EVENTS[1], orjson.dumps({**orjson.loads(EVENTS[2]), "ip": "300.1.1.1"}).decode(),
           EVENTS[3]]
    leases = Leases(100)
    msgs = [message(0, EVENTS[4]), batch_message(1, bad, Shape("sns", True, "ndjson"))]
    leases.add(msgs)
    out, dead = await transform(msgs, leases)
    keys = [dict(zip(COLUMNS, row))["message_id"] for row, _ in out]
    assert keys == ["m-0", "m-1:0", "m-1:2", "m-1:4"]
    assert out[0][1] is msgs[0] and all(isinstance(item, Part) and item.msg is msgs[1] for _, item in out[1:])
    assert [(p.index, rule) for p, rule, _ in dead] == [(1, "body.json"), (3, "ip.invalid")]
    assert body_of(dead[0][0]) == "not json" and orjson.loads(body_of(dead[1][0]))["ip"] == "300.1.1.1"
    assert leases.rows == 1 + 5 and leases.bytes > len(msgs[1]["Body"])  # weighed: events, decompressed bytes


async def test_an_undecodable_message_is_dead_lettered_whole() -> None:
    out, dead = await transform([message(0, "H4sI!!"), batch_message(1, EVENTS * 3)], how=Decoding(max_events=10))
    assert out == [] and [(m["MessageId"], rule) for m, rule, _ in dead] == [
        ("m-0", "encoding.base64"), ("m-1", "framing.too_many_events")]


def test_settle_counts_down_and_keeps() -> None:
    # CASE: a split message is returned once, with its last part; kept (given back) if any part was kept
    out = asyncio.run(transform([batch_message(0, EVENTS[:3]), batch_message(1, EVENTS[:2])]))[0]
    parts = [item for _, item in out]
    a, b = parts[:3], parts[3:]
    assert settle(a[:2]) == ([], []) and settle([a[2]]) == ([a[0].msg], [])
    assert settle([b[0]], keep=True) == ([], []) and settle([b[1]]) == ([], [b[0].msg])
    plain = message(9)
    assert settle([plain]) == ([plain], []) and settle([plain], keep=True) == ([], [plain])


async def run_acker(sqs: FakeSqs, outcomes: list[Any], held: list[dict], *, queue: str = "q") -> tuple[Acker, Stats, Leases]:
    stats, leases, inbox = Stats(), Leases(10_000), asyncio.Queue()
    leases.add(held)
    acker = Acker(sqs, queue, "dlq", inbox, leases, stats, 2, auth=MASKER.origin_auth)
    for o in outcomes:
        inbox.put_nowait(o)
    inbox.put_nowait(None)
    await asyncio.wait_for(acker.run(), 10)
    return acker, stats, leases


async def parts_of(msg: dict) -> tuple[list[Part], list]:
    out, dead = await transform([msg])
    return [item for _, item in out], dead


async def test_message_is_deleted_only_after_its_last_event_is_committed_or_dead_lettered() -> None:
    msg = batch_message(0, [EVENTS[0], "42", EVENTS[1]])
    parts, dead = await parts_of(msg)
    sqs = FakeSqs()
    _, stats, leases = await run_acker(sqs, [Committed(parts[:1])], [msg])
    assert "delete" not in sqs.calls and len(leases) == 1  # two events still open
    sqs = FakeSqs()
    parts, dead = await parts_of(msg)
    _, stats, leases = await run_acker(sqs, [Committed(parts[:1]), DeadLetter(dead), Committed(parts[1:])], [msg])
    assert sqs.handles("delete") == ["h-0"] and stats.acked == 1 and len(leases) == 0
    [call] = sqs.calls["send"]
    [entry] = call["Entries"]
    attrs = {k: v["StringValue"] for k, v in entry["MessageAttributes"].items()}
    assert entry["MessageBody"] == "42" and attrs["source_event_index"] == "1" and attrs["source_message_id"] == "m-0"
    assert attrs["rule"] == "body.type" and stats.rejected == 1
    # The note is signed with the event's body: redrive promotes it, and no other body or index.
    as_received = {"MessageId": "dlq-1", "Body": entry["MessageBody"], "Attributes": {"SentTimestamp": "1"},
                   "MessageAttributes": entry["MessageAttributes"]}
    assert _identity(as_received, MASKER.origin_auth) == (Notes.SIGNED, "m-0:1", attrs["source_sent_timestamp"])
    assert _identity({**as_received, "Body": "43"}, MASKER.origin_auth)[0] is Notes.NOT_TRUSTED


async def test_a_redelivered_event_keeps_its_message() -> None:
    # CASE: one event left for redelivery -> the others resolve, the message is not deleted, its lease is dropped
    msg = batch_message(0, EVENTS[:3])
    parts, _ = await parts_of(msg)
    sqs = FakeSqs()
    _, stats, leases = await run_acker(sqs, [Redeliver(parts[1:2]), Committed(parts[:1] + parts[2:])], [msg])
    assert "delete" not in sqs.calls and len(leases) == 0 and leases.rows == 0


async def test_refused_event_dead_letter_leaves_the_message() -> None:
    msg = batch_message(0, [EVENTS[0], "42"])
    parts, dead = await parts_of(msg)
    sqs = FakeSqs().then("send", {"Successful": [], "Failed": [failed_entry("0", "InvalidParameterValue", True)]})
    acker, stats, leases = await run_acker(sqs, [Committed(parts), DeadLetter(dead)], [msg])
    assert "delete" not in sqs.calls and len(leases) == 0 and acker.refused == {"m-0": "InvalidParameterValue"}


async def test_fifo_event_dead_letters_keep_the_group_and_dedupe_per_event() -> None:
    msg = batch_message(0, ["1", EVENTS[0], "2"], group="g1")
    parts, dead = await parts_of(msg)
    sqs = FakeSqs()
    await run_acker(sqs, [DeadLetter(dead), Committed(parts)], [msg], queue="q.fifo")
    entries = [e for c in sqs.calls["send"] for e in c["Entries"]]
    assert [e["MessageGroupId"] for e in entries] == ["g1", "g1"]
    assert [e["MessageDeduplicationId"] for e in entries] == [
        hashlib.sha256(f"m-0:{i}".encode()).hexdigest() for i in (0, 2)]
    assert sqs.handles("delete") == ["h-0"]


async def test_leases_cap_rows_and_bytes() -> None:
    # CASE: a held message weighing many rows (or bytes) stops polling until it is dropped
    leases = Leases(100, max_rows=50, max_bytes=10_000)
    leases.add([message(0)])
    assert not leases.full(10)
    leases.weigh("h-0", 60, 0)
    assert leases.full(10) and leases.rows == 60
    waiter = asyncio.create_task(leases.reserve(10))
    await asyncio.sleep(0)
    assert not waiter.done()
    leases.drop(["h-0"])
    await asyncio.wait_for(waiter, 1)
    assert leases.rows == 0 and leases.bytes == 0
    leases.add([message(1)])
    leases.weigh("h-1", 2, 20_000)
    assert leases.full(1) and leases.bytes == 20_000 + 2
    leases.drop(["h-1"])
    assert not leases.full(1)
