"""``python -m pipeline redrive``: dead letters go back to the source queue and land once after a fix."""

from __future__ import annotations

import time

import orjson
import pytest

from pipeline.redrive import _entry
from pipeline.runner import run
from pipeline.sample import sample_bodies
from stages.masking import Masker, generate_key, parse_key
from tests.helpers import drain, fetch, make_settings, pipeline_env, queue_counts, run_cli

pytestmark = pytest.mark.e2e

KEY = generate_key("redrive").encode()
AUTH = Masker([parse_key(KEY)]).origin_auth  # what the redrive command signs with


def _send(client, queue_url: str, bodies: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    ids: list[str] = []
    for i in range(0, len(bodies), 10):
        resp = client.send_message_batch(
            QueueUrl=queue_url, Entries=[{"Id": str(j), "MessageBody": b} for j, b in enumerate(bodies[i : i + 10])])
        got = {int(e["Id"]): e["MessageId"] for e in resp["Successful"]}
        ids += [got[j] for j in range(len(got))]
    return ids


def _redrive(env: dict[str, str], *args: str) -> dict:
    out = run_cli("redrive", *args, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return orjson.loads(out.stdout.strip().splitlines()[-1])


async def test_redrive_after_a_fix_stores_each_event_once_under_its_original_id(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, KEY)
    settings = make_settings(queues, pg_dsn, KEY)
    assert run_cli("migrate", env=env).returncode == 0
    # A constraint that turns out to be wrong: the database rejects 12 good events.
    fetch(pg_dsn, "ALTER TABLE user_logins ADD CONSTRAINT no_ios CHECK (device_type <> 'ios')")
    bodies = [b for b in sample_bodies(80, seed=31)]
    ids = _send(queues.client, queues.queue_url, bodies)
    first = await run(settings, until_empty=True)
    refused = {m: b for m, b in zip(ids, bodies) if orjson.loads(b)["device_type"] == "ios"}
    assert first["rejected"] == len(refused) > 3 and first["rejected_by_rule"] == {"db.23514": len(refused)}
    sent_at = {r["message_id"]: r["create_date"] for r in fetch(pg_dsn, "SELECT message_id, create_date FROM user_logins")}

    fetch(pg_dsn, "ALTER TABLE user_logins DROP CONSTRAINT no_ios")  # the fix

    # An earlier redrive was interrupted after sending 3 of them, before deleting them from the DLQ.
    interrupted = queues.client.receive_message(
        QueueUrl=queues.dlq_url, MaxNumberOfMessages=3, VisibilityTimeout=1, WaitTimeSeconds=1,
        MessageAttributeNames=["All"], MessageSystemAttributeNames=["All"])["Messages"]
    queues.client.send_message_batch(QueueUrl=queues.queue_url, Entries=[_entry(i, m, AUTH) for i, m in enumerate(interrupted)])
    time.sleep(1.5)  # they are visible in the DLQ again

    partial = _redrive(env, "--max", "4")
    assert partial["moved"] == 4 and partial["by_rule"] == {"db.23514": 4}
    rest = _redrive(env)
    assert rest["moved"] == len(refused) - 4 and rest["failed"] == 0
    assert partial["notes_not_trusted"] == rest["notes_not_trusted"] == 0  # the acker signed every note
    assert queue_counts(queues.client, queues.dlq_url) == (0, 0)

    # On the source queue: the original body and identity, not the rejection notes.
    peek = queues.client.receive_message(QueueUrl=queues.queue_url, MaxNumberOfMessages=10, VisibilityTimeout=1,
                                         WaitTimeSeconds=1, MessageAttributeNames=["All"])["Messages"]
    assert all(set(m["MessageAttributes"]) == {"origin_message_id", "origin_sent_timestamp", "origin_signature"}
               for m in peek)
    assert all(AUTH.problem(m) is None for m in peek)  # signed with the ring's active key
    assert {m["MessageAttributes"]["origin_message_id"]["StringValue"] for m in peek} <= set(refused)
    assert all(m["Body"] == refused[m["MessageAttributes"]["origin_message_id"]["StringValue"]] for m in peek)
    time.sleep(1.5)

    second = await run(settings, until_empty=True)
    assert second["inserted"] == len(refused) and second["duplicates"] == 3 and second["rejected"] == 0, second
    rows = fetch(pg_dsn, "SELECT message_id, user_id, create_date FROM user_logins")
    assert sorted(r["message_id"] for r in rows) == sorted(ids)  # every event once, under its original id
    by_id = {r["message_id"]: r for r in rows}
    assert all(by_id[m]["user_id"] == orjson.loads(b)["user_id"] for m, b in refused.items())
    day = next(iter(sent_at.values()))
    assert all(by_id[m]["create_date"] == day for m in refused)  # the original send date
    assert queue_counts(queues.client, queues.queue_url) == (0, 0) and drain(queues.client, queues.dlq_url) == []

    # Nothing left: a no-op.
    assert _redrive(env)["moved"] == 0


async def test_redriven_message_rejected_again_keeps_its_original_identity(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """Not fixed yet: it goes back to the DLQ, still naming the original message, and is not moved twice in one go."""
    env = pipeline_env(queues, pg_dsn, KEY)
    settings = make_settings(queues, pg_dsn, KEY)
    [orig] = _send(queues.client, queues.queue_url, ["not json"])
    await run(settings, until_empty=True)
    assert _redrive(env)["moved"] == 1
    await run(settings, until_empty=True)
    dead = drain(queues.client, queues.dlq_url)
    assert len(dead) == 1 and dead[0]["Body"] == "not json"
    attrs = {k: v["StringValue"] for k, v in dead[0]["MessageAttributes"].items()}
    assert attrs["source_message_id"] == orig and attrs["rule"] == "body.json"
