"""Transform workers (``stages.offload``): the same outcomes as inline, a dead worker costs nothing.

Real worker processes (spawned), no services: the transformer is fed receive batches by hand.
"""

from __future__ import annotations

import asyncio
import os
import signal

import orjson

from pipeline.harness.shapes import Shape
from pipeline.sample import sample_bodies
from stages.decode import Decoding
from stages.masking import Masker, generate_key
from stages.offload import MIN_BYTES, TransformPool
from stages.parts import Part, body_of
from stages.stats import Stats
from stages.transform import Transformer
from tests.helpers import process_alive
from tests.unit.test_parts import batch_message, message

MASKER = Masker([generate_key("o1")])
EVENTS = sample_bodies(120, seed=4)


def batches() -> list[list[dict]]:
    bad = orjson.dumps({**orjson.loads(EVENTS[0]), "ip": "300.1.1.1"}).decode()
    big = EVENTS[:60] + ["not json", bad] + EVENTS[60:100]
    shapes = [Shape("none", False, "array"), Shape("sns", True, "ndjson"), Shape("eventbridge", True, "array")]
    out = []
    for b in range(4):
        msgs = [batch_message(10 * b + i, big, shapes[i % 3]) for i in range(3)]
        poison = message(10 * b + 5, EVENTS[b + 1])
        poison["Attributes"]["ApproximateReceiveCount"] = "9"  # dead-lettered before any transform
        msgs += [message(10 * b + 3, EVENTS[b]), message(10 * b + 4, "not json"), poison]
        out.append(msgs)
    return out


async def run(workers: TransformPool | None, feed: list[list[dict]], stats: Stats | None = None) -> tuple[list, list]:
    inbox, sink, acks = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
    for b in feed:
        inbox.put_nowait(b)
    inbox.put_nowait(None)
    await Transformer(inbox, sink, acks, MASKER, stats or Stats(), 5, workers=workers).run()
    rows, keys, dead = [], [], []
    while (item := sink.get_nowait()) is not None:
        rows += item[0]
        keys += [i.key if isinstance(i, Part) else i["MessageId"] for i in item[1]]
    while not acks.empty():
        dead += [(e[0].key if isinstance(e[0], Part) else e[0]["MessageId"], e[1], body_of(e[0]))
                 for e in acks.get_nowait().entries]
    return (rows, keys), dead


async def test_workers_give_what_the_inline_path_gives() -> None:
    # CASE: batches of every shape, with bad events, one-event, undecodable and poison messages
    # -> the same rows, items and dead letters (bodies included), in the same order
    feed = batches()
    assert all(len(m["Body"]) >= MIN_BYTES for b in feed for m in b[:3])
    pool = TransformPool(1, MASKER, Decoding())
    assert await run(pool, batches()) == await run(None, feed)
    assert pool._pool is None  # closed when the transformer stopped


async def test_small_messages_never_start_a_pool() -> None:
    # CASE: only one-event messages -> transformed inline, no process started
    pool = TransformPool(2, MASKER, Decoding())
    (rows, _), _ = await run(pool, [[message(i, EVENTS[i]) for i in range(5)]])
    assert len(rows) == 5 and pool._pool is None


def kill_worker_at(pool: TransformPool, call: int) -> list[int]:
    """Kill the pool's worker right after its ``call``-th batch is sent; returns ``[batches sent]``."""
    submit, calls = pool.submit, [0]

    def killing_submit(messages: list) -> tuple | None:
        calls[0] += 1
        sent = submit(messages)
        if calls[0] == call:
            for pid in list(pool._pool._processes):  # type: ignore[union-attr]
                os.kill(pid, signal.SIGKILL)
        return sent

    pool.submit = killing_submit  # type: ignore[method-assign]
    return calls


async def test_a_dead_worker_costs_nothing() -> None:
    # CASE: the worker is killed while batches are under way -> those are transformed inline, counted,
    # and a new pool takes the next ones: the outcome is the inline one
    pool, stats = TransformPool(1, MASKER, Decoding()), Stats()
    calls = kill_worker_at(pool, 2)
    assert await run(pool, batches(), stats) == await run(None, batches())
    assert stats.errors["transform_workers"] == 1 and calls == [4]  # one death, counted once


async def test_batches_of_a_dead_pool_do_not_stop_its_successor() -> None:
    # CASE: the worker dies with two batches under way while more keep coming: each stale batch is
    # transformed inline, the new pool started meanwhile is left alone (nothing cancelled), and the
    # outcome is the inline one
    pool, stats = TransformPool(1, MASKER, Decoding()), Stats()
    kill_worker_at(pool, 2)
    inbox, sink, acks = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
    transformer = asyncio.create_task(Transformer(inbox, sink, acks, MASKER, stats, 5, workers=pool).run())
    feed = batches() + batches()
    for b in feed[:2]:
        inbox.put_nowait(b)
    await asyncio.sleep(0.2)
    for b in feed[2:]:
        inbox.put_nowait(b)
        await asyncio.sleep(0)
    inbox.put_nowait(None)
    await asyncio.wait_for(transformer, 60)
    rows = []
    while (item := sink.get_nowait()) is not None:
        rows += item[0]
    (want, _), _ = await run(None, batches() + batches())
    assert rows == want and stats.errors["transform_workers"] == 1


def test_an_event_too_deep_for_orjson_to_write_is_dead_lettered_whole() -> None:
    # CASE: a bad event nested 300 deep (orjson reads 1,024 levels, writes 255) -> its dead letter
    # carries it whole, and nothing crashes, inline or in a worker
    deep = {"user_id": "u-1", "x": "[" * 300 + "]" * 300}
    deep["x"] = orjson.loads(deep["x"])
    body = "[" + ",".join(EVENTS[:30] + [orjson.dumps({"user_id": "u"}).decode().replace('"u"}', '"u","x":'
                                                                                       + "[" * 300 + "]" * 300 + "}")]) + "]"
    msg = message(1, body)
    for pool in (None, TransformPool(1, MASKER, Decoding())):
        (rows, _), dead = asyncio.run(run(pool, [[msg]]))
        assert len(rows) == 30 and len(dead) == 1
        key, rule, text = dead[0]
        assert key == "m-1:30" and rule == "device_type.missing"
        assert orjson.loads(text.replace("[" * 300 + "]" * 300, "[]")) == {"user_id": "u", "x": []}


def test_a_stored_events_dead_letter_body_is_found_again() -> None:
    # CASE: the database refuses the row of a stored event (its Part holds no text) -> its dead
    # letter's body is the event's JSON, decoded again from a gzip batch in an SNS envelope
    msg = batch_message(1, EVENTS[:3], Shape("sns", True, "ndjson"))
    inbox, sink, acks = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
    inbox.put_nowait([msg])
    inbox.put_nowait(None)
    asyncio.run(Transformer(inbox, sink, acks, MASKER, Stats(), 5).run())
    parts = sink.get_nowait()[1]
    assert [orjson.loads(body_of(p)) for p in parts] == [orjson.loads(e) for e in EVENTS[:3]]


def test_refused_rows_of_one_message_decode_it_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # CASE: every row of a 200-event message refused -> one decode for all their dead letters, not one each
    import stages.parts

    msg = batch_message(1, EVENTS[:100] * 2, Shape("none", True, "array"))
    inbox, sink, acks = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
    inbox.put_nowait([msg])
    inbox.put_nowait(None)
    asyncio.run(Transformer(inbox, sink, acks, MASKER, Stats(), 5).run())
    parts = sink.get_nowait()[1]
    decodes = 0
    real = stages.parts.decode

    def counting(*args, **kw):  # type: ignore[no-untyped-def]
        nonlocal decodes
        decodes += 1
        return real(*args, **kw)

    monkeypatch.setattr(stages.parts, "decode", counting)
    assert [body_of(p) for p in parts] == [body_of(p) for p in parts] and len(parts) == 200
    assert decodes == 1


_KILLED_PARENT = """
import asyncio, multiprocessing, os, sys
from stages.decode import Decoding
from stages.masking import Masker, generate_key
from stages.offload import TransformPool

async def main():
    pool = TransformPool(1, Masker([generate_key("o2")]), Decoding())
    await pool.submit([(sys.argv[1], None, "m-1", 0, False)])[1]
    print(*(c.pid for c in multiprocessing.active_children() if "Process" in c.name), flush=True)
    os.kill(os.getpid(), 9)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_workers_exit_when_the_pipeline_is_killed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # CASE: kill -9 of the pipeline process -> its transform workers exit too (no orphan keeps the key)
    import subprocess
    import sys
    import time

    script = tmp_path / "killed.py"
    script.write_text(_KILLED_PARENT)
    body = "[" + ",".join(EVENTS[:40]) + "]"
    out = subprocess.run([sys.executable, str(script), body], capture_output=True, text=True, timeout=60,
                         cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    pids = [int(p) for p in out.stdout.split()]
    assert out.returncode == -signal.SIGKILL and pids, out.stderr[-2000:]
    deadline = time.monotonic() + 20
    while any(process_alive(p) for p in pids):
        assert time.monotonic() < deadline, "a transform worker outlived its pipeline"
        time.sleep(0.05)
