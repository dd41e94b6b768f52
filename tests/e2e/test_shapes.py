"""Message shapes on real LocalStack and PostgreSQL: envelopes x encodings x framings, bad events inside
batches, undecodable messages, both caps, redrive of an event dead letter, the loadgen mix, kill -9."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import os
import random
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.harness.shapes import SHAPES, UNDECODABLE_KINDS, Shape, encode, undecodable
from pipeline.redrive import _entry
from pipeline.runner import run
from pipeline.sample import sample_bodies
from stages.masking import Masker, generate_key, parse_key
from stages.sqs import send_batches
from tests.e2e.support import Cli, row_count, wait_for
from tests.helpers import drain, fetch, make_settings, pipeline_env, queue_counts, run_cli

pytestmark = pytest.mark.e2e

KEY = generate_key("shapes").encode()
AUTH = Masker([parse_key(KEY)]).origin_auth


def send(client: Any, queue_url: str, messages: list[tuple[str, dict]]) -> list[tuple[str, int]]:
    """Send ``(body, attributes)`` pairs; return each one's (message id, SentTimestamp)."""
    ids: list[str] = []
    for batch in send_batches(messages, lambda m: m[0]):
        entries = [{"Id": str(j), "MessageBody": b, **({"MessageAttributes": a} if a else {})}
                   for j, (b, a) in enumerate(batch)]
        resp = client.send_message_batch(QueueUrl=queue_url, Entries=entries)
        assert not resp.get("Failed"), resp["Failed"]
        got = {int(e["Id"]): e["MessageId"] for e in resp["Successful"]}
        ids += [got[j] for j in range(len(batch))]
    return ids


def bad_event(user: str) -> str:
    return orjson.dumps({"user_id": user, "device_type": "ios", "ip": "300.1.2.3", "device_id": "1-2-3",
                         "app_version": "1.0"}).decode()


async def test_every_shape_in_one_queue(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """Each envelope x encoding x framing (gzip detected and signalled), bad events inside batches, undecodable
    messages and both caps, in one queue and one run: every valid event once under its key, every bad one in the DLQ."""
    rng = random.Random(5)
    events = iter(sample_bodies(400, seed=21))
    messages: list[tuple[str, dict]] = []
    expect_rows: list[list[str | None]] = []  # per message: event texts stored (None = that index dead-lettered)
    expect_dead: list[tuple[int | None, str, str | None]] = []  # (message #, rule, event index or None = whole)
    for attribute in (False, True):
        for shape in SHAPES:
            if attribute and not shape.gzip:
                continue
            n = 1 if shape.framing == "single" else rng.randint(2, 9)
            texts: list[str] = [next(events) for _ in range(n)]
            if n > 2:  # bad events inside the batch: invalid ip, and not an object (or not JSON)
                texts[1], texts[-1] = bad_event(f"bad-{len(messages)}"), "not json"
            body, attrs = encode(texts, shape, attribute=attribute)
            i = len(messages)
            messages.append((body, attrs))
            stored: list[str | None] = list(texts)
            if n > 2:
                stored[1] = stored[-1] = None
                expect_dead += [(i, "ip.invalid", "1"),
                                (i, "body.json" if shape.framing == "ndjson" else "body.type", str(n - 1))]
            expect_rows.append(stored)
    for kind in UNDECODABLE_KINDS:
        body, rule = undecodable(kind)
        expect_dead.append((len(messages), rule, None))
        messages.append((body, {}))
        expect_rows.append([])
    # The caps: 30 events with max_events_per_message 25, and a gzip bomb past max_decoded_bytes.
    expect_dead.append((len(messages), "framing.too_many_events", None))
    messages.append(encode([next(events) for _ in range(30)], Shape("sns", True, "ndjson")))
    expect_rows.append([])
    bomb = base64.b64encode(gzip.compress(b"[" + b" " * 5_000_000 + b"]")).decode()
    expect_dead.append((len(messages), "encoding.too_large", None))
    messages.append((bomb, {"content-encoding": {"DataType": "String", "StringValue": "gzip"}}))
    expect_rows.append([])

    ids = send(queues.client, queues.queue_url, messages)
    settings = make_settings(queues, pg_dsn, KEY, batch_size=40, max_events_per_message=25, max_decoded_bytes=2**20)
    summary = await run(settings, until_empty=True)

    want = {}
    for mid, stored in zip(ids, expect_rows):
        for j, text in enumerate(stored):
            if text is not None:
                want[mid if len(stored) == 1 else f"{mid}:{j}"] = orjson.loads(text)["user_id"]
    rows = fetch(pg_dsn, "SELECT message_id, user_id, create_date FROM user_logins")
    assert sorted(r["message_id"] for r in rows) == sorted(want)  # each once, under its key
    assert all(want[r["message_id"]] == r["user_id"] for r in rows)
    today = dt.datetime.now(dt.timezone.utc).date()
    assert {r["create_date"] for r in rows} <= {today, today - dt.timedelta(days=1)}
    assert summary["inserted"] == len(want) and summary["rejected"] == len(expect_dead), summary

    dead = drain(queues.client, queues.dlq_url)
    got = sorted((d["MessageAttributes"]["source_message_id"]["StringValue"],
                  d["MessageAttributes"].get("source_event_index", {}).get("StringValue"),
                  d["MessageAttributes"]["rule"]["StringValue"]) for d in dead)
    assert got == sorted((ids[i], idx, rule) for i, rule, idx in expect_dead)
    for d in dead:
        attrs = {k: v["StringValue"] for k, v in d["MessageAttributes"].items()}
        i = ids.index(attrs["source_message_id"])
        if attrs["rule"] == "ip.invalid":  # the event alone, as JSON
            assert orjson.loads(d["Body"]) == orjson.loads(bad_event(f"bad-{i}"))
        elif "source_event_index" in attrs:  # the NDJSON line as it was, or the array element as JSON
            assert d["Body"] in ("not json", '"not json"')
        else:  # the message whole, as it was sent
            assert d["Body"] == messages[i][0]
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)


async def test_redrive_of_an_event_dead_letter_restores_its_key_and_date(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """An event the database refused is dead-lettered alone; after the fix, redriven twice, it is stored once
    under ``<message id>:<index>`` with its message's date, and its message's other events are untouched."""
    env = pipeline_env(queues, pg_dsn, KEY)
    settings = make_settings(queues, pg_dsn, KEY)
    assert run_cli("migrate", env=env).returncode == 0
    fetch(pg_dsn, "ALTER TABLE user_logins ADD CONSTRAINT no_ios CHECK (device_type <> 'ios')")
    texts = [orjson.dumps({**orjson.loads(b), "device_type": d}).decode()
             for b, d in zip(sample_bodies(4, seed=8), ["android", "ios", "android", "android"])]
    [mid] = send(queues.client, queues.queue_url, [encode(texts, Shape("sns", True, "ndjson"))])
    first = await run(settings, until_empty=True)
    assert (first["inserted"], first["rejected"], first["acked"]) == (3, 1, 1), first
    day = fetch(pg_dsn, "SELECT create_date FROM user_logins LIMIT 1")[0]["create_date"]
    fetch(pg_dsn, "ALTER TABLE user_logins DROP CONSTRAINT no_ios")  # the fix

    # An interrupted redrive already sent one copy, then the real one moves it again.
    [dl] = queues.client.receive_message(QueueUrl=queues.dlq_url, MaxNumberOfMessages=1, VisibilityTimeout=0,
                                         WaitTimeSeconds=1, MessageAttributeNames=["All"],
                                         MessageSystemAttributeNames=["All"])["Messages"]
    assert dl["MessageAttributes"]["source_event_index"]["StringValue"] == "1"
    assert orjson.loads(dl["Body"]) == orjson.loads(texts[1])
    queues.client.send_message_batch(QueueUrl=queues.queue_url, Entries=[_entry(0, dl, AUTH)])
    wait_for(lambda: queue_counts(queues.client, queues.dlq_url)[0] == 1, 30, "the dead letter to be visible again")
    out = run_cli("redrive", env=env, timeout=120)
    assert out.returncode == 0 and orjson.loads(out.stdout.strip().splitlines()[-1])["moved"] == 1, out.stderr[-2000:]

    second = await run(settings, until_empty=True)
    assert (second["inserted"], second["duplicates"], second["rejected"]) == (1, 1, 0), second
    rows = fetch(pg_dsn, "SELECT message_id, device_type, create_date FROM user_logins ORDER BY message_id")
    assert [(r["message_id"], r["device_type"]) for r in rows] == [
        (f"{mid}:{i}", orjson.loads(t)["device_type"]) for i, t in enumerate(texts)]
    assert {r["create_date"] for r in rows} == {day}
    assert queue_counts(queues.client, queues.queue_url) == (0, 0) and drain(queues.client, queues.dlq_url) == []


def test_loadgen_mix_drains_exactly(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """The held-out mix from loadgen: every valid event stored once, every bad event or undecodable message in the
    DLQ with a reason, the source queue empty."""
    env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_PIPELINE__BATCH_SIZE="200")
    out = run_cli("loadgen", "--count", "120", "--mix", "--events-per-message", "30", "--invalid-ratio", "0.05",
                  "--undecodable-ratio", "0.05", "--seed", "4", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    sent = orjson.loads(out.stdout.strip().splitlines()[-1])
    assert sent["sent"] == 120 and sent["undecodable"] > 0 and sent["invalid"] > 0 and sent["events"] > 600
    ran = run_cli("run", "--until-empty", env=env, timeout=180)
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = orjson.loads(ran.stdout.strip().splitlines()[-1])
    valid = sent["valid"] + sent["duplicates"]
    assert summary["inserted"] == valid and summary["rejected"] == sent["invalid"] + sent["undecodable"], summary
    assert fetch(pg_dsn, "SELECT count(*) AS n FROM user_logins")[0]["n"] == valid
    dead = drain(queues.client, queues.dlq_url)
    assert len(dead) == summary["rejected"] and all(d["MessageAttributes"]["reason"]["StringValue"] for d in dead)
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)


@pytest.mark.slow
def test_kill9_mid_batched_backlog(queues, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 while a backlog of 100-event messages drains; after a restart every event is stored exactly once."""
    n_msgs, per = int(os.environ.get("KILL9_BATCHES", "150")), 100
    seed = int(os.environ.get("KILL9_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    texts = sample_bodies(n_msgs * per, seed=seed)
    shapes = [Shape("none", False, "array"), Shape("sns", True, "ndjson"), Shape("eventbridge", True, "array")]
    messages = [encode(texts[i * per:(i + 1) * per], shapes[i % 3]) for i in range(n_msgs)]
    ids = send(queues.client, queues.queue_url, messages)
    kill_at = rng.randint(len(texts) // 10, len(texts) // 2)
    print(f"kill -9 after {kill_at} of {len(texts)} rows (KILL9_SEED={seed})")
    env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_SQS__VISIBILITY_TIMEOUT="5", PIPELINE_PIPELINE__BATCH_SIZE="100",
                       PIPELINE_PIPELINE__MAX_IN_FLIGHT_ROWS="1000", PIPELINE_PIPELINE__PROGRESS_INTERVAL="1")
    first = Cli(tmp_path, env, name="killed")
    try:
        wait_for(lambda: row_count(pg_dsn) >= kill_at or not first.alive, 120, "rows to arrive")
        assert first.alive, f"finished before the kill; stderr:\n{first.stderr[-2000:]}"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    finally:
        first.stop()
    assert row_count(pg_dsn) < len(texts)
    second = Cli(tmp_path, env, "--until-empty", name="restart")
    try:
        assert second.wait(240) == 0, second.stderr[-3000:]
    finally:
        second.stop()
    rows = fetch(pg_dsn, "SELECT message_id, user_id FROM user_logins")
    assert len(rows) == len({r["message_id"] for r in rows}) == len(texts)
    want = {f"{mid}:{j}": orjson.loads(texts[i * per + j])["user_id"] for i, mid in enumerate(ids) for j in range(per)}
    assert {r["message_id"]: r["user_id"] for r in rows} == want
    assert queue_counts(queues.client, queues.queue_url) == (0, 0) and drain(queues.client, queues.dlq_url) == []
    # The row cap held: what a receive brings may pass it, never much more.
    held = [e["held_rows"] for cli in (second,) for e in cli.logs() if e.get("msg") == "progress"]
    assert all(h <= 1000 + 10 * per * 8 for h in held)
