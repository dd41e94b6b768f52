"""Poison messages: a message that keeps failing for a reason other than validation.

It goes to the DLQ once its ``ApproximateReceiveCount`` passes ``sqs.max_receive_count``,
with the reason, and never blocks the messages around it.
"""

from __future__ import annotations

import orjson
import pytest

from pipeline.runner import run
from pipeline.sample import sample_bodies
from stages.masking import generate_key
from tests.helpers import drain, fetch, make_settings, pipeline_env, queue_counts, run_cli, send_bodies

pytestmark = pytest.mark.e2e

KEY = generate_key("poison").encode()


def _stored_users(dsn: str) -> list[str]:
    return [r["user_id"] for r in fetch(dsn, "SELECT user_id FROM user_logins")]


async def test_message_received_too_often_is_dead_lettered_as_poison(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """A message some consumer kept dying on (receive count pushed past the maximum) goes to the DLQ."""
    good = sample_bodies(30, seed=21)
    victim = good.pop()
    send_bodies(queues.client, queues.queue_url, [victim])
    count = 0
    while count < 3:  # three consumers received it and never finished
        msgs = queues.client.receive_message(
            QueueUrl=queues.queue_url, VisibilityTimeout=0, WaitTimeSeconds=1,
            MessageSystemAttributeNames=["ApproximateReceiveCount"]).get("Messages", [])
        if msgs:
            count = int(msgs[0]["Attributes"]["ApproximateReceiveCount"])
    send_bodies(queues.client, queues.queue_url, good)

    summary = await run(make_settings(queues, pg_dsn, KEY, sqs={"max_receive_count": 3}), until_empty=True)
    assert summary["rejected_by_rule"] == {"poison": 1} and summary["inserted"] == len(good), summary
    dead = drain(queues.client, queues.dlq_url)
    assert [m["Body"] for m in dead] == [victim]
    attrs = {k: v["StringValue"] for k, v in dead[0]["MessageAttributes"].items()}
    assert attrs["rule"] == "poison" and attrs["reason"] == "poison: received 4 times without being stored"
    assert sorted(_stored_users(pg_dsn)) == sorted(orjson.loads(b)["user_id"] for b in good)
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)


async def test_row_the_database_keeps_refusing_becomes_poison(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """A trigger raises for one row (not a data/constraint error): that row is isolated and left for
    redelivery, its neighbours commit, and after max_receive_count receives it is dead-lettered."""
    out = run_cli("migrate", env=pipeline_env(queues, pg_dsn, KEY))
    assert out.returncode == 0, out.stderr
    fetch(pg_dsn, """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.user_id = 'refused-by-trigger' THEN RAISE EXCEPTION 'user is refused'; END IF;
            RETURN NEW;
        END $$""")
    fetch(pg_dsn, "CREATE TRIGGER refuse BEFORE INSERT ON user_logins FOR EACH ROW EXECUTE FUNCTION refuse()")
    good = sample_bodies(60, seed=22)
    bad = orjson.dumps({**orjson.loads(good[0]), "user_id": "refused-by-trigger"}).decode()
    send_bodies(queues.client, queues.queue_url, good[:30] + [bad] + good[30:])

    settings = make_settings(queues, pg_dsn, KEY, batch_size=100, sqs={"max_receive_count": 2, "visibility_timeout": 2})
    summary = await run(settings, until_empty=True)
    assert summary["inserted"] == 60 and summary["rejected_by_rule"] == {"poison": 1}, summary
    assert summary["errors"]["postgres"] == 2  # one failed attempt per receive, then poison
    dead = drain(queues.client, queues.dlq_url)
    assert [m["Body"] for m in dead] == [bad]
    assert dead[0]["MessageAttributes"]["reason"]["StringValue"] == "poison: received 3 times without being stored"
    assert len(_stored_users(pg_dsn)) == 60 and "refused-by-trigger" not in _stored_users(pg_dsn)
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)
