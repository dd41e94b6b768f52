"""Origin attributes are a trust boundary: a producer cannot pick a row's identity, only redrive can.

Every forged kind aims at the worst outcome: the id of an event already sent (its row would
absorb the forged event, which would then be deleted as a duplicate) and a 1970 send time.
"""

from __future__ import annotations

import datetime as dt
import time

import orjson
import pytest

from pipeline.sample import sample_bodies
from stages.masking import Masker, generate_key, parse_key
from stages.message import ORIGIN_ID, ORIGIN_SENT, ORIGIN_SIG, UNAUTHENTICATED
from tests.e2e.support import wait_for
from tests.helpers import drain, fetch, pipeline_env, queue_counts, run_cli

pytestmark = pytest.mark.e2e

KEY = generate_key("origin").encode()
AUTH = Masker([parse_key(KEY)]).origin_auth  # the ring the pipeline runs with
RETIRED = Masker([generate_key("origin")]).origin_auth  # same key id, a key that is no longer in the ring


def _attrs(mid: str, sent: str, sig: str | None) -> dict:
    out = {ORIGIN_ID: {"DataType": "String", "StringValue": mid},
           ORIGIN_SENT: {"DataType": "Number", "StringValue": sent}}
    if sig is not None:
        out[ORIGIN_SIG] = {"DataType": "String", "StringValue": sig}
    return out


def _cli(env: dict[str, str], *args: str) -> tuple[dict, str]:
    out = run_cli(*args, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return orjson.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_forged_origins_never_collapse_events_nor_backdate_rows_and_redrive_restores_them(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, KEY)
    bodies = sample_bodies(7, seed=57)
    assert len(set(bodies)) == 7
    victim_body, forged_bodies = bodies[0], bodies[1:]
    victim = queues.client.send_message(QueueUrl=queues.queue_url, MessageBody=victim_body)["MessageId"]
    now = str(int(time.time() * 1000))
    b, c, d, e, f, g = forged_bodies
    forged = [  # (body, attributes): each would give the victim's id, most of them a 1970 date
        (b, _attrs(victim, "0", None)),  # no signature
        (c, _attrs(victim, "0", "origin.FORGEDSIGNATUREFORGEDSIGNATUREFORGEDSIG")),  # wrong signature
        (d, _attrs(victim, "0", AUTH.sign(victim, "0", victim_body))),  # a genuine signature of another body
        (e, _attrs(victim, "0", AUTH.sign("redriven-e", "0", e))),  # replayed under another id
        (f, _attrs(victim, "0", AUTH.sign(victim, now, f))),  # backdated
        (g, _attrs(victim, "0", RETIRED.sign(victim, "0", g))),  # under a key that left the ring
    ]
    own_ids = []
    for body, attrs in forged:
        own_ids.append(queues.client.send_message(
            QueueUrl=queues.queue_url, MessageBody=body, MessageAttributes=attrs)["MessageId"])

    first, logs = _cli(env, "run", "--until-empty")
    assert first["inserted"] == 1 and first["duplicates"] == 0, first
    assert first["rejected"] == 6 and first["rejected_by_rule"] == {UNAUTHENTICATED: 6}, first
    assert "FORGEDSIGNATURE" not in logs and victim not in logs  # logged without values
    rows = fetch(pg_dsn, "SELECT message_id, user_id, create_date FROM user_logins")
    assert [r["message_id"] for r in rows] == [victim] and rows[0]["user_id"] == orjson.loads(victim_body)["user_id"]

    # The dead letters name each message's own id and time, never the forged identity.
    dead: dict[str, dict] = {}

    def peek() -> bool:  # look without deleting: they become visible again for redrive
        for m in queues.client.receive_message(QueueUrl=queues.dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=2,
                                               WaitTimeSeconds=1, MessageAttributeNames=["All"]).get("Messages", []):
            dead[m["MessageId"]] = m
        return len(dead) == 6

    wait_for(peek, 30, "six dead letters")
    notes = [{k: v["StringValue"] for k, v in m["MessageAttributes"].items()} for m in dead.values()]
    assert sorted(n["source_message_id"] for n in notes) == sorted(own_ids)
    assert all(n["rule"] == UNAUTHENTICATED and n["reason"].startswith("origin: ") for n in notes)
    assert all(int(n["source_sent_timestamp"]) > 1_600_000_000_000 for n in notes)
    assert all(not set(n) & {ORIGIN_ID, ORIGIN_SENT, ORIGIN_SIG} for n in notes)
    wait_for(lambda: queue_counts(queues.client, queues.dlq_url) == (6, 0), 30, "dead letters visible again")

    # After review, redrive puts them back under their own (now signed) identity: nothing was lost.
    moved, _ = _cli(env, "redrive")
    assert moved["moved"] == 6 and moved["by_rule"] == {UNAUTHENTICATED: 6}
    second, _ = _cli(env, "run", "--until-empty")
    assert second["inserted"] == 6 and second["rejected"] == 0 and second["duplicates"] == 0, second
    rows = fetch(pg_dsn, "SELECT message_id, create_date FROM user_logins")
    assert sorted(r["message_id"] for r in rows) == sorted([victim, *own_ids])  # 7 events, 7 rows
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    assert all(r["create_date"] >= yesterday for r in rows)  # nothing backdated
    assert drain(queues.client, queues.dlq_url) == []


def test_forged_dead_letter_notes_never_choose_an_identity_at_redrive(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """Whoever can send to the DLQ writes a note naming the victim's id and 1970: redrive ignores it."""
    env = pipeline_env(queues, pg_dsn, KEY)
    bodies = sample_bodies(5, seed=58)
    victim_body, forged_bodies = bodies[0], bodies[1:]
    victim = queues.client.send_message(QueueUrl=queues.queue_url, MessageBody=victim_body)["MessageId"]
    first, _ = _cli(env, "run", "--until-empty")
    assert first["inserted"] == 1, first

    def note(sig: str | None, index: str | None = None) -> dict:
        out = {"source_message_id": victim, "source_sent_timestamp": "0", "rule": "body.json", "reason": "forged"}
        if index is not None:
            out["source_event_index"] = index
        if sig is not None:
            out["source_signature"] = sig
        return {k: {"DataType": "Number" if k in ("source_sent_timestamp", "source_event_index") else "String",
                    "StringValue": v} for k, v in out.items()}

    b, c, d, e = forged_bodies
    forged = [
        (b, note(None)),  # an unsigned note
        (c, note("origin.FORGEDSIGNATUREFORGEDSIGNATUREFORGEDSIG")),  # a made-up signature
        (d, note(AUTH.sign(victim, "0", victim_body))),  # a genuine signature of another body
        (e, note(AUTH.sign(victim, "0", e), index="3")),  # a genuine signature, moved to another event index
    ]
    own_ids = [queues.client.send_message(QueueUrl=queues.dlq_url, MessageBody=body, MessageAttributes=attrs)["MessageId"]
               for body, attrs in forged]

    moved, logs = _cli(env, "redrive")
    assert moved["moved"] == 4 and moved["notes_not_trusted"] == 4, moved
    assert "FORGEDSIGNATURE" not in logs
    second, _ = _cli(env, "run", "--until-empty")
    assert second["inserted"] == 4 and second["duplicates"] == 0 and second["rejected"] == 0, second
    rows = fetch(pg_dsn, "SELECT message_id, user_id, create_date FROM user_logins")
    assert sorted(r["message_id"] for r in rows) == sorted([victim, *own_ids])  # each under its own id
    assert next(r for r in rows if r["message_id"] == victim)["user_id"] == orjson.loads(victim_body)["user_id"]
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    assert all(r["create_date"] >= yesterday for r in rows)  # nothing backdated
