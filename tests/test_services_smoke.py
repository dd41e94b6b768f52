"""Fast checks that the service fixtures (LocalStack, PostgreSQL, TcpProxy) really work."""

from __future__ import annotations

import asyncio
import threading
import time

import asyncpg
import pytest
from botocore.exceptions import BotoCoreError, ClientError

from tests.conftest import Queues
from tests.services import LocalStack, Postgres, TcpProxy, sqs_client


def _fetchval(dsn: str, sql: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_sqs_round_trip(queues: Queues) -> None:
    queues.client.send_message(QueueUrl=queues.queue_url, MessageBody='{"user_id": "u1"}')
    msgs = queues.client.receive_message(QueueUrl=queues.queue_url, WaitTimeSeconds=2)["Messages"]
    assert [m["Body"] for m in msgs] == ['{"user_id": "u1"}']
    queues.client.delete_message(QueueUrl=queues.queue_url, ReceiptHandle=msgs[0]["ReceiptHandle"])
    assert queues.dlq_url.endswith("-dlq") and queues.queue_url.startswith(queues.endpoint)


def test_pg_fresh_database(pg_dsn: str, postgres: Postgres) -> None:
    assert _fetchval(pg_dsn, "SELECT 1") == 1
    db = _fetchval(pg_dsn, "SELECT current_database()")
    assert isinstance(db, str) and db.startswith("t_")
    assert _fetchval(postgres.url(db, tcp=True), "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0


def test_pg_stop_start(pg_dsn: str, postgres: Postgres) -> None:
    _fetchval(pg_dsn, "CREATE TABLE t AS SELECT 42 AS x")
    postgres.stop()
    assert not postgres.running
    with pytest.raises(OSError):
        _fetchval(pg_dsn, "SELECT 1")
    postgres.start()
    assert _fetchval(pg_dsn, "SELECT x FROM t") == 42


def test_proxy_block_unblock(localstack: LocalStack, queues: Queues) -> None:
    with TcpProxy.to_url(localstack.endpoint) as proxy:
        client = sqs_client(proxy.endpoint, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=15)
        client.send_message(QueueUrl=queues.queue_url, MessageBody="via proxy")

        # A long poll in flight is cut off by block(), not left hanging until its wait time ends.
        errors: list[Exception] = []

        def long_poll() -> None:
            try:
                client.receive_message(QueueUrl=queues.dlq_url, WaitTimeSeconds=10)
            except (BotoCoreError, ClientError) as exc:
                errors.append(exc)

        poller = threading.Thread(target=long_poll)
        poller.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        proxy.block()
        poller.join(5)
        assert not poller.is_alive() and errors and time.monotonic() - t0 < 5

        with pytest.raises(BotoCoreError):  # EndpointConnectionError: connection refused
            client.get_queue_attributes(QueueUrl=queues.queue_url)
        proxy.unblock()
        body = client.receive_message(QueueUrl=queues.queue_url, WaitTimeSeconds=2)["Messages"][0]["Body"]
        assert body == "via proxy"
        client.close()
