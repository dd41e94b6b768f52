"""The whole pipeline, end to end, against LocalStack and PostgreSQL."""

from __future__ import annotations

import random
import time
import uuid

import asyncpg
import orjson

from pipeline.runner import run
from pipeline.sample import MALFORMED, WRONG_TYPE, sample_bodies
from pipeline.schema import migrate
from stages.masking import Masker, generate_key, parse_key
from stages.sink import CopySink, create_stage_table
from stages.transform import to_row
from tests.helpers import (
    TAKEHOME_DDL, drain, fetch, make_settings, pipeline_env, queue_counts, run_cli, send_bodies,
)

KEY = generate_key("e2e").encode()


def takehome_events(n: int, seed: int = 7) -> list[dict]:
    """Takehome-shaped events with repeated ips and device ids, as in the original queue."""
    rng = random.Random(seed)
    ips = [f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in range(40)]
    devices = [f"{rng.randint(100, 999)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}" for _ in range(40)]
    versions = ["2.3.0", "0.96", "3.7", "2.00", "0.2.6", "5.0.4"]
    return [{
        "user_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "app_version": rng.choice(versions),
        "device_type": rng.choice(["android", "ios"]),
        "ip": rng.choice(ips),
        "locale": rng.choice([None, "RU", "PH", "US"]),
        "device_id": rng.choice(devices),
    } for _ in range(n)]


def test_takehome_acceptance(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """99 valid events + the wrong-type message into a pre-created takehome table, via the CLI."""
    fetch(pg_dsn, TAKEHOME_DDL)
    events = takehome_events(99)
    send_bodies(queues.client, queues.queue_url, [orjson.dumps(e).decode() for e in events] + [WRONG_TYPE])
    env = pipeline_env(queues, pg_dsn, KEY)

    first = run_cli("run", "--until-empty", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = orjson.loads(first.stdout.strip().splitlines()[-1])
    assert (summary["received"], summary["inserted"], summary["rejected"], summary["duplicates"]) == (100, 99, 1, 0)

    rows = fetch(pg_dsn, "SELECT * FROM user_logins")
    assert len(rows) == 99
    by_user = {r["user_id"]: r for r in rows}
    masker = Masker([parse_key(KEY)])
    ip_masks: dict[str, set[str]] = {}
    dev_masks: dict[str, set[str]] = {}
    for e in events:
        r = by_user[e["user_id"]]
        assert r["app_version"] == e["app_version"] and r["locale"] == e["locale"]
        assert r["device_type"] == e["device_type"]
        assert masker.unmask(r["masked_ip"]) == e["ip"] and masker.unmask(r["masked_device_id"]) == e["device_id"]
        ip_masks.setdefault(e["ip"], set()).add(r["masked_ip"])
        dev_masks.setdefault(e["device_id"], set()).add(r["masked_device_id"])
    # Consistent (one mask per value) and distinct (different values, different masks).
    assert all(len(m) == 1 for m in ip_masks.values()) and all(len(m) == 1 for m in dev_masks.values())
    assert len({next(iter(m)) for m in ip_masks.values()}) == len(ip_masks)
    assert len({next(iter(m)) for m in dev_masks.values()}) == len(dev_masks)

    # The CLI unmasks too.
    sample = rows[0]
    out = run_cli("unmask", sample["masked_ip"], sample["masked_device_id"], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [masker.unmask(sample["masked_ip"]), masker.unmask(sample["masked_device_id"])]

    dead = drain(queues.client, queues.dlq_url)
    assert [m["Body"] for m in dead] == [WRONG_TYPE]
    assert "not a login event" in dead[0]["MessageAttributes"]["reason"]["StringValue"]
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)

    raw = {e["ip"] for e in events} | {e["device_id"] for e in events}
    for text in (first.stdout, first.stderr):
        assert not [v for v in raw if v in text]

    second = run_cli("run", "--until-empty", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert orjson.loads(second.stdout.strip().splitlines()[-1])["inserted"] == 0
    assert len(fetch(pg_dsn, "SELECT 1 FROM user_logins")) == 99


async def test_malformed_bodies_go_to_dlq_and_neighbours_land_once(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    good = sample_bodies(40, seed=3)
    g = orjson.loads(good[0])
    bad = [
        WRONG_TYPE, *MALFORMED,
        orjson.dumps({**g, "user_id": "x\x00y"}).decode(),
        orjson.dumps({**g, "device_id": "9" * 257}).decode(),
        orjson.dumps({**g, "user_id": "u" * 129}).decode(),
        orjson.dumps({**g, "ip": "1.2.3.256"}).decode(),
        orjson.dumps({**g, "ip": 16909060}).decode(),
        orjson.dumps({**g, "app_version": 2}).decode(),
        orjson.dumps({**g, "locale": ["RU"]}).decode(),
        '{"user_id": null}', "{}", "null", "true", '"string"', "[" * 5000 + "]" * 5000,
    ]
    mixed = good[:20] + bad + good[20:]
    random.Random(1).shuffle(mixed)
    send_bodies(queues.client, queues.queue_url, mixed)
    summary = await run(make_settings(queues, pg_dsn, KEY), until_empty=True)
    assert summary["inserted"] == 40 and summary["rejected"] == len(bad)
    dead = drain(queues.client, queues.dlq_url)
    assert sorted(m["Body"] for m in dead) == sorted(bad)
    assert all(m["MessageAttributes"]["reason"]["StringValue"] for m in dead)
    rows = fetch(pg_dsn, "SELECT message_id, count(*) AS n FROM user_logins GROUP BY 1")
    assert len(rows) == 40 and all(r["n"] == 1 for r in rows)
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)


async def test_redelivered_messages_are_deduplicated(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """A previous consumer committed rows but died before deleting: the redelivery adds nothing."""
    send_bodies(queues.client, queues.queue_url, sample_bodies(15, seed=5))
    got: list[dict] = []
    while len(got) < 15:
        got += queues.client.receive_message(
            QueueUrl=queues.queue_url, MaxNumberOfMessages=10, VisibilityTimeout=2,
            MessageSystemAttributeNames=["SentTimestamp"]).get("Messages", [])
    masker = Masker([parse_key(KEY)])
    conn = await asyncpg.connect(pg_dsn)
    await migrate(conn, "user_logins")
    await conn.close()
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1, init=lambda c: create_stage_table(c, "user_logins"))
    import asyncio

    from pipeline.metrics import Stats

    sink = CopySink(pool, "user_logins", asyncio.Queue(), asyncio.Queue(), Stats(), batch_size=100, batch_timeout=1)
    rows = [to_row(m["Body"], m["MessageId"], int(m["Attributes"]["SentTimestamp"]), masker) for m in got]
    await sink.flush(rows, got)
    await pool.close()
    time.sleep(2.5)  # the "crashed" consumer's visibility timeout runs out

    summary = await run(make_settings(queues, pg_dsn, KEY), until_empty=True)
    assert summary["received"] == 15 and summary["duplicates"] == 15 and summary["inserted"] == 0
    assert summary["acked"] == 15
    assert len(fetch(pg_dsn, "SELECT 1 FROM user_logins")) == 15
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)


def test_cli_errors_are_one_line(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, KEY)
    cases = {
        "PIPELINE_SQS__QUEUEURL": ("x", "unknown configuration variable PIPELINE_SQS__QUEUEURL"),
        "PIPELINE_SQS__RECEIVERS": ("many", "sqs.receivers"),
        "PIPELINE_MASKING__KEY": ("", "no masking key"),
        "PIPELINE_SQS__ENDPOINT_URL": ("http://127.0.0.1:9", "unreachable"),
        "PIPELINE_POSTGRES__DSN": ("postgresql://postgres:hunter2@127.0.0.1:9/x", "unreachable"),
        "PIPELINE_SQS__CREATE_DLQ": ("false", "does not exist"),
    }
    for var, (value, expected) in cases.items():
        extra = {"PIPELINE_SQS__DLQ_URL": queues.queue_url + "-missing"} if var == "PIPELINE_SQS__CREATE_DLQ" else {}
        out = run_cli("run", "--until-empty", env={**env, var: value, **extra}, timeout=60)
        assert out.returncode != 0, var
        lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], (var, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and "hunter2" not in out.stderr
