"""Session fixtures that run real LocalStack (SQS/KMS) and PostgreSQL, started from PyPI packages.

Services start lazily: a test run that never asks for ``localstack`` or ``postgres`` pays nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tests.services` must import under any pytest import mode
    sys.path.insert(0, str(REPO))

from pipeline.harness._services import LocalStack, ensure_venv
from tests.localstack_compat import patch_venv
from tests.services import REGION, Postgres, sqs_client

CACHE_DIR = REPO / ".cache"  # LocalStack venv, reused across runs (git-ignored)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (fault injection, volume)")
    config.addinivalue_line("markers", "e2e: runs the whole pipeline against LocalStack and PostgreSQL")


def pytest_unconfigure(config: pytest.Config) -> None:
    # pgserver logs from an atexit hook after pytest has closed the captured streams; that line is
    # noise, not a failure, so logging must not print a "Logging error" traceback for it.
    logging.raiseExceptions = False


@pytest.fixture(scope="session", autouse=True)
def aws_env() -> Iterator[None]:
    """Dummy AWS credentials for the whole session, so no test can ever reach real AWS accounts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        yield


@dataclass(frozen=True)
class RunningSqs:
    """An SQS-compatible endpoint that is already running (``PIPELINE_TEST_SQS_ENDPOINT``)."""

    endpoint: str


@pytest.fixture(scope="session")
def localstack() -> Iterator[LocalStack | RunningSqs]:
    """One LocalStack per session (~1-2 s warm; ~1 min on the first run, which installs its venv).

    ``PIPELINE_TEST_SQS_ENDPOINT`` reuses a running LocalStack (the compose stack, or one shared by
    several test runs), the way asyncpg's test base reuses ``PGHOST``; nothing is installed then.
    """
    running = os.environ.get("PIPELINE_TEST_SQS_ENDPOINT")
    if running:
        yield RunningSqs(running.rstrip("/"))
        return
    patch_venv(ensure_venv(CACHE_DIR.resolve() / "localstack-venv"))  # KMS on Python 3.11
    ls = LocalStack.start(CACHE_DIR)
    try:
        yield ls
    finally:
        ls.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL per session.

    The data dir lives in a fresh dir under the system tmp, not pytest's basetemp: as root the
    server runs as user ``pgserver``, and pytest resets ``/tmp/pytest-of-root`` to 0700 whenever
    another session starts, which would stop this server from being restarted mid-test.
    """
    root = Path(tempfile.mkdtemp(prefix="pytest-pg-"))
    pg = Postgres(root / "data")
    try:
        yield pg
    finally:
        pg.close()
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Queues:
    queue_url: str
    dlq_url: str
    endpoint: str
    client: Any  # botocore SQS client (sync), bound to ``endpoint``


@pytest.fixture
def queues(localstack: LocalStack) -> Iterator[Queues]:
    """A fresh queue and dead-letter queue (no redrive policy attached), deleted afterwards."""
    client = sqs_client(localstack.endpoint)
    name = f"t-{uuid.uuid4().hex[:8]}"
    queue_url = client.create_queue(QueueName=name)["QueueUrl"]
    dlq_url = client.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    try:
        yield Queues(queue_url, dlq_url, localstack.endpoint, client)
    finally:
        delete_queues(client, queue_url, dlq_url)
        client.close()


def delete_queues(client: Any, *urls: str) -> None:
    """Delete test queues; one already gone (or a LocalStack already stopped) leaves nothing to clean."""
    for url in urls:
        try:
            client.delete_queue(QueueUrl=url)
        except (BotoCoreError, ClientError):
            pass


@pytest.fixture
def pg_dsn(postgres: Postgres) -> Iterator[str]:
    """DSN (unix socket) of a fresh, empty database; dropped afterwards even if connections linger."""
    postgres.start()  # heal a server a previous fault test left stopped
    name = f"t_{uuid.uuid4().hex[:8]}"
    postgres.psql(f"CREATE DATABASE {name}")
    try:
        yield postgres.url(name)
    finally:
        postgres.start()
        postgres.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
