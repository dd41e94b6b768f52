"""The hostile corpus, mixed into valid traffic, through LocalStack and PostgreSQL."""

from __future__ import annotations

import random

import orjson
import pytest
from botocore.exceptions import ClientError

from pipeline.runner import run
from pipeline.sample import sample_bodies
from stages.masking import Masker, generate_key, parse_key
from stages.transform import normalise_ip
from tests.e2e.corpus import BAD, ODD, UNSENDABLE
from tests.helpers import send_bodies
from tests.helpers import drain, fetch, make_settings, queue_counts

pytestmark = pytest.mark.e2e

KEY = generate_key("hostile").encode()


def mixed_traffic(valid: int, seed: int) -> list[tuple[str, object]]:
    """(body, case) pairs: the corpus shuffled into ``valid`` ordinary events (case None)."""
    items: list[tuple[str, object]] = [(b, None) for b in sample_bodies(valid, seed=seed)]
    items += [(c.body, c) for c in [*BAD, *ODD]]
    random.Random(seed).shuffle(items)
    return items


def test_sqs_refuses_what_json_escapes_would_be_needed_for(queues) -> None:  # type: ignore[no-untyped-def]
    """Raw NUL (and other control characters) cannot even reach the queue: SQS refuses them."""
    for body in UNSENDABLE:
        with pytest.raises(ClientError) as info:
            queues.client.send_message(QueueUrl=queues.queue_url, MessageBody=body)
        assert info.value.response["Error"]["Code"] == "InvalidMessageContents"


async def test_hostile_corpus_in_valid_traffic(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    items = mixed_traffic(300, seed=41)
    ids = send_bodies(queues.client, queues.queue_url, [b for b, _ in items])
    summary = await run(make_settings(queues, pg_dsn, KEY, batch_size=50), until_empty=True)
    assert summary["rejected"] == len(BAD) and summary["inserted"] == 300 + len(ODD), summary

    # Each bad body: in the DLQ once, unchanged, with its own rule and reason.
    dead = {m["MessageAttributes"]["source_message_id"]["StringValue"]: m for m in drain(queues.client, queues.dlq_url)}
    assert len(dead) == len(BAD)
    for mid, (body, case) in zip(ids, items):
        if case in BAD:
            m = dead.pop(mid)
            attrs = {k: v["StringValue"] for k, v in m["MessageAttributes"].items()}
            assert m["Body"] == body and attrs["rule"] == case.rule, case.name  # type: ignore[union-attr]
            if case.reason:  # type: ignore[union-attr]
                assert attrs["reason"] == case.reason, case.name  # type: ignore[union-attr]
    assert not dead

    # Each odd-but-valid body and each ordinary event: exactly one row, stored as sent.
    rows = fetch(pg_dsn, "SELECT * FROM user_logins")
    by_id = {r["message_id"]: r for r in rows}
    assert len(by_id) == len(rows) == 300 + len(ODD)
    masker = Masker([parse_key(KEY)])
    for mid, (body, case) in zip(ids, items):
        if case in BAD:
            assert mid not in by_id
            continue
        row, event = by_id[mid], orjson.loads(body)
        assert row["user_id"] == event["user_id"], getattr(case, "name", mid)  # SQL-looking ids verbatim
        assert (row["device_type"], row["app_version"], row["locale"]) == (
            event["device_type"], event["app_version"], event.get("locale"))
        assert masker.unmask(row["masked_ip"]) == normalise_ip(event["ip"])
        assert masker.unmask(row["masked_device_id"]) == event["device_id"]
        for column, value in getattr(case, "stored", {}).items():
            got = masker.unmask(row["masked_" + column]) if column in ("ip", "device_id") else row[column]
            assert got == value, (case.name, column)  # type: ignore[union-attr]
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)
    assert fetch(pg_dsn, "SELECT to_regclass('user_logins') IS NOT NULL AS ok")[0]["ok"]
