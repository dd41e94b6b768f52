"""Small helpers shared by stage and end-to-end tests (real services only)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg

from pipeline.settings import Settings
from stages.sqs import send_batches

REPO = Path(__file__).resolve().parents[1]


def make_settings(queues: Any, dsn: str, key: str, **pipeline: Any) -> Settings:
    sqs = {"endpoint_url": queues.endpoint, "queue_url": queues.queue_url, "dlq_url": queues.dlq_url,
           "wait_time_seconds": 1, "receivers": 4}
    sqs.update(pipeline.pop("sqs", {}))
    return Settings(
        sqs=sqs, postgres={"dsn": dsn}, masking={"key": key},
        pipeline={"batch_timeout": 0.2, "progress_interval": 5, **pipeline},
    )


def pipeline_env(queues: Any, dsn: str, key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update({
        "PIPELINE_SQS__ENDPOINT_URL": queues.endpoint,
        "PIPELINE_SQS__QUEUE_URL": queues.queue_url,
        "PIPELINE_SQS__DLQ_URL": queues.dlq_url,
        "PIPELINE_SQS__REGION": "us-east-1",
        "PIPELINE_SQS__WAIT_TIME_SECONDS": "1",
        "PIPELINE_POSTGRES__DSN": dsn,
        "PIPELINE_MASKING__KEY": key,
        "PIPELINE_PIPELINE__BATCH_TIMEOUT": "0.2",
        **extra,
    })
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 180, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout, input=input,
    )


async def wait_until(cond: Any, timeout: float = 30, what: str = "condition") -> None:
    """Poll ``cond()`` until it holds; fail after ``timeout`` seconds (never a fixed sleep and an exact count)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


def send_bodies(client: Any, queue_url: str, bodies: list[str]) -> list[str]:
    """Send in ``SendMessageBatch`` calls the size limits allow; return the message ids in order."""
    ids: list[str] = []
    for batch in send_batches(bodies, str, overhead=0):
        resp = client.send_message_batch(
            QueueUrl=queue_url, Entries=[{"Id": str(j), "MessageBody": b} for j, b in enumerate(batch)])
        assert not resp.get("Failed"), resp["Failed"]
        got = {int(e["Id"]): e["MessageId"] for e in resp["Successful"]}
        ids.extend(got[j] for j in range(len(batch)))
    return ids


def drain(client: Any, queue_url: str, *, wait: int = 1) -> list[dict]:
    """Receive and delete everything visible (DLQ inspection)."""
    out: list[dict] = []
    while True:
        resp = client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait,
                                      MessageAttributeNames=["All"], MessageSystemAttributeNames=["All"])
        msgs = resp.get("Messages", [])
        if not msgs:
            return out
        out += msgs
        client.delete_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])


def queue_counts(client: Any, queue_url: str) -> tuple[int, int]:
    a = client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(go()) if not _in_loop() else _run_in_thread(go)


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _run_in_thread(fn: Any) -> Any:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(lambda: asyncio.run(fn())).result()


TAKEHOME_DDL = """
CREATE TABLE IF NOT EXISTS user_logins(
    user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
    masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date)
"""


def process_alive(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie (exited, not yet reaped by whoever adopted it) does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
