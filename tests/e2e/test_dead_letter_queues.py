"""Dead letters on real LocalStack: FIFO queues, dead letters SQS refuses, and a DLQ equal to the source.

The classes under test: whatever the DLQ does, valid traffic is stored and acked, nothing is
lost, nothing waits forever, and the operator gets one line saying what is wrong.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from pipeline.runner import Runtime, run
from pipeline.sample import sample_bodies
from stages.masking import generate_key
from tests.conftest import Queues, delete_queues
from tests.helpers import drain, fetch, make_settings, pipeline_env, queue_counts, run_cli, send_bodies

pytestmark = pytest.mark.e2e

KEY = generate_key("dlq").encode()


@pytest.fixture
def fifo_queues(localstack: Any, queues: Queues) -> Iterator[Queues]:
    """A FIFO source and a FIFO DLQ (deduplication by id, not content)."""
    client = queues.client
    name = f"f-{uuid.uuid4().hex[:8]}"
    q = client.create_queue(QueueName=f"{name}.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    d = client.create_queue(QueueName=f"{name}-dlq.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    try:
        yield Queues(q, d, queues.endpoint, client)
    finally:
        delete_queues(client, q, d)


def _send_fifo(client: Any, url: str, bodies_by_group: dict[str, list[str]]) -> None:
    for group, bodies in bodies_by_group.items():
        for i in range(0, len(bodies), 10):
            entries = [{"Id": str(j), "MessageBody": b, "MessageGroupId": group,
                        "MessageDeduplicationId": uuid.uuid4().hex} for j, b in enumerate(bodies[i:i + 10])]
            resp = client.send_message_batch(QueueUrl=url, Entries=entries)
            assert not resp.get("Failed"), resp["Failed"]


def _users(dsn: str) -> list[str]:
    return sorted(r["user_id"] for r in fetch(dsn, "SELECT user_id FROM user_logins"))


async def test_fifo_source_and_dlq_end_to_end(fifo_queues: Queues, pg_dsn: str) -> None:
    """Bad messages inside FIFO groups are dead-lettered in their group, with a deduplication id;
    every valid message is stored and the source ends empty (today this hung)."""
    good = sample_bodies(60, seed=5)
    groups = {f"g{g}": good[g * 20:(g + 1) * 20] for g in range(3)}
    groups["g0"].insert(3, "not json")
    groups["g2"].insert(0, '{"foo": "oops_wrong_msg_type"}')
    _send_fifo(fifo_queues.client, fifo_queues.queue_url, groups)

    summary = await asyncio.wait_for(run(make_settings(fifo_queues, pg_dsn, KEY), until_empty=True), 120)
    assert summary["inserted"] == 60 and summary["rejected"] == 2, summary
    assert _users(pg_dsn) == sorted(orjson.loads(b)["user_id"] for b in good)
    dead = drain(fifo_queues.client, fifo_queues.dlq_url)
    assert sorted((m["Attributes"]["MessageGroupId"], m["Body"]) for m in dead) == [
        ("g0", "not json"), ("g2", '{"foo": "oops_wrong_msg_type"}')]
    assert all(m["Attributes"].get("MessageDeduplicationId") for m in dead)
    assert queue_counts(fifo_queues.client, fifo_queues.queue_url) == (0, 0)


async def test_fifo_dlq_name_is_derived_valid_and_created(fifo_queues: Queues, pg_dsn: str) -> None:
    """No DLQ configured: a FIFO source gets `<name>-dlq.fifo`, created as a FIFO queue."""
    client = fifo_queues.client
    client.delete_queue(QueueUrl=fifo_queues.dlq_url)
    _send_fifo(client, fifo_queues.queue_url, {"a": ["garbage"], "b": sample_bodies(5, seed=1)})
    settings = make_settings(fifo_queues, pg_dsn, KEY)
    sqs = settings.sqs.model_dump() | {"dlq_url": ""}
    settings = settings.model_copy(update={"sqs": type(settings.sqs)(**sqs)})
    assert settings.sqs.dlq_url.endswith("-dlq.fifo"), settings.sqs.dlq_url
    summary = await asyncio.wait_for(run(settings, until_empty=True), 120)
    assert summary["inserted"] == 5 and summary["rejected"] == 1, summary
    attrs = client.get_queue_attributes(QueueUrl=settings.sqs.dlq_url, AttributeNames=["FifoQueue"])["Attributes"]
    assert attrs["FifoQueue"] == "true"
    assert [m["Body"] for m in drain(client, settings.sqs.dlq_url)] == ["garbage"]


def test_check_and_run_refuse_a_dlq_of_another_type(fifo_queues: Queues, queues: Queues, pg_dsn: str) -> None:
    """A FIFO source with a standard DLQ (and the reverse) is one FAIL line in check, one error line in run."""
    for source, dlq in ((fifo_queues.queue_url, queues.dlq_url), (queues.queue_url, fifo_queues.dlq_url)):
        env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_SQS__QUEUE_URL=source, PIPELINE_SQS__DLQ_URL=dlq)
        out = run_cli("check", env=env, timeout=120)
        assert out.returncode == 1, out.stdout
        assert [line for line in out.stdout.splitlines() if line.startswith("FAIL")] == [
            line for line in out.stdout.splitlines() if "a DLQ must be of its source's type" in line]
        res = run_cli("run", "--until-empty", env=env, timeout=120)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 1 and len(errors) == 1 and "a DLQ must be of its source's type" in errors[0]
        assert "Traceback" not in res.stderr


def test_dlq_equal_to_the_source_is_refused(queues: Queues, pg_dsn: str) -> None:
    """The same URL (a config error) or the same queue under another URL spelling (same ARN)."""
    same = pipeline_env(queues, pg_dsn, KEY, PIPELINE_SQS__DLQ_URL=queues.queue_url)
    alias = queues.queue_url.replace("127.0.0.1", "localhost")
    by_arn = pipeline_env(queues, pg_dsn, KEY, PIPELINE_SQS__DLQ_URL=alias)
    for env, code in ((same, 2), (by_arn, 1)):
        for cmd in (("check",), ("run", "--until-empty")):
            out = run_cli(*cmd, env=env, timeout=120)
            text = out.stdout + out.stderr
            assert out.returncode == code, (cmd, text)
            assert "Traceback" not in text
            assert "source queue" in text, text


async def test_refused_dead_letters_never_block_valid_traffic(queues: Queues, pg_dsn: str) -> None:
    """A DLQ whose MaximumMessageSize is below the rejects' size refuses them for good. The 2,000 valid
    messages around them are stored and acked anyway, --until-empty ends, and the refused messages
    stay on the source queue, counted by SQS error code."""
    client = queues.client
    client.set_queue_attributes(QueueUrl=queues.dlq_url, Attributes={"MaximumMessageSize": "1024"})
    good = sample_bodies(2000, seed=9)
    big_bad = [orjson.dumps({"user_id": f"u{i}", "pad": "x" * 2000}).decode() for i in range(12)]
    small_bad = ["not json"] * 3  # fits in the DLQ: dead-lettered as usual
    bodies = good[:1000] + big_bad + small_bad + good[1000:]
    send_bodies(client, queues.queue_url, bodies)

    settings = make_settings(queues, pg_dsn, KEY, sqs={"ackers": 2, "visibility_timeout": 5})
    rt = Runtime(settings)
    summary = await asyncio.wait_for(run(settings, until_empty=True, runtime=rt), 180)
    assert summary["inserted"] == 2000, summary
    assert sum(summary["not_dead_lettered"].values()) == 12, summary
    assert summary["rejected"] == 3 and summary["acked"] == 2003, summary
    assert len(fetch(pg_dsn, "SELECT 1 FROM user_logins")) == 2000
    assert sorted(m["Body"] for m in drain(client, queues.dlq_url)) == small_bad
    visible, in_flight = queue_counts(client, queues.queue_url)
    assert visible + in_flight == 12  # not lost: still on the source, waiting for a DLQ that takes them


def test_until_empty_with_refused_dead_letters_exits_non_zero_with_one_line(queues: Queues, pg_dsn: str) -> None:
    client = queues.client
    client.set_queue_attributes(QueueUrl=queues.dlq_url, Attributes={"MaximumMessageSize": "1024"})
    send_bodies(client, queues.queue_url, sample_bodies(50, seed=2) + ['{"pad": "' + "y" * 3000 + '"}'])
    env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_SQS__VISIBILITY_TIMEOUT="5")
    out = run_cli("run", "--until-empty", env=env, timeout=180)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1, out.stderr[-2000:]
    assert len(errors) == 1 and "1 message(s) could not be dead-lettered" in errors[0], errors
    assert "Traceback" not in out.stderr
    assert orjson.loads(out.stdout.splitlines()[-1])["inserted"] == 50


async def test_dlq_deleted_mid_run_does_not_stall_acks(queues: Queues, pg_dsn: str) -> None:
    """The DLQ disappears while running: rejects are refused (queue gone), valid messages keep flowing,
    and /readyz-style readiness names the condition."""
    from pipeline.http import Readiness

    client = queues.client
    settings = make_settings(queues, pg_dsn, KEY, sqs={"visibility_timeout": 5, "create_dlq": False})
    rt = Runtime(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop, runtime=rt))
    try:
        async def wait_for(cond: Any, timeout: float = 60) -> None:
            deadline = asyncio.get_running_loop().time() + timeout
            while not cond():
                assert asyncio.get_running_loop().time() < deadline, "condition not reached"
                assert not task.done(), task.result()
                await asyncio.sleep(0.1)

        await wait_for(lambda: rt.running)
        client.delete_queue(QueueUrl=queues.dlq_url)
        good = sample_bodies(300, seed=4)
        send_bodies(client, queues.queue_url, ["bad-1", "bad-2"] + good + ["bad-3"])
        await wait_for(lambda: rt.stats.acked >= 300 and rt.acker is not None and len(rt.acker.refused) == 3)
        problems = await Readiness(rt).problems()
        assert "3 message(s) could not be dead-lettered" in problems["dlq"], problems
    finally:
        stop.set()
        summary = await asyncio.wait_for(task, 60)
    assert summary["inserted"] == 300 and summary["rejected"] == 0, summary
    assert sum(summary["not_dead_lettered"].values()) == 3


def test_preflight_error_for_same_arn_is_one_line() -> None:
    """``queue_pair_problem`` is what run and check share: a pure function over both queues' attributes."""
    from pipeline.clients import queue_pair_problem

    arn = "arn:aws:sqs:us-east-1:000000000000:q"
    assert "is the source queue" in (queue_pair_problem({"QueueArn": arn}, {"QueueArn": arn}) or "")
    assert queue_pair_problem({"QueueArn": arn}, {"QueueArn": arn + "-dlq"}) is None
    assert "FIFO" in (queue_pair_problem({"QueueArn": "a", "FifoQueue": "true"}, {"QueueArn": "b"}) or "")
