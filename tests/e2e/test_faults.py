"""Fault injection, end to end: the CLI against real LocalStack and PostgreSQL, while things break.

Whatever fails -- a kill -9, a stopped database, an unreachable SQS endpoint, a batch stuck
longer than the visibility timeout, a SIGTERM, competing instances -- every event must end
up in the table exactly once and the queue must end up empty.

The kill -9 test is sized by ``KILL9_EVENTS`` (default 3000) and its kill point drawn from
``KILL9_SEED`` (default: random, printed), so the held-out run is
``KILL9_EVENTS=20000 pytest tests/e2e/test_faults.py -k kill9``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from pipeline.sample import sample_bodies
from stages.masking import generate_key
from tests.e2e.support import PG_PASSWORD, Cli, row_count, send_all, tcp_dsn, wait_for
from tests.helpers import drain, fetch, pipeline_env, queue_counts, run_cli
from tests.services import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = generate_key("faults").encode()


@pytest.fixture
def clis(tmp_path: Path) -> Iterator[Callable[..., Cli]]:
    """Start pipeline subprocesses; any still running at the end of the test is killed."""
    started: list[Cli] = []

    def start(env: dict[str, str], *args: str, name: str = "run") -> Cli:
        cli = Cli(tmp_path, env, *args, name=f"{name}-{len(started)}")
        started.append(cli)
        return cli

    yield start
    for cli in started:
        cli.stop()


def assert_exactly_once(dsn: str, message_ids: list[str], bodies: list[str]) -> None:
    """One row per sent message, none extra, each with the user_id of its body."""
    rows = fetch(dsn, "SELECT message_id, user_id FROM user_logins")
    by_id: dict[str, int] = {}
    for r in rows:
        by_id[r["message_id"]] = by_id.get(r["message_id"], 0) + 1
    dupes = {k: n for k, n in by_id.items() if n > 1}
    assert not dupes, f"{len(dupes)} message ids stored more than once"
    assert set(by_id) == set(message_ids), (len(set(message_ids) - set(by_id)), "missing", len(set(by_id) - set(message_ids)), "extra")
    users = {r["message_id"]: r["user_id"] for r in rows}
    assert all(users[m] == orjson.loads(b)["user_id"] for m, b in zip(message_ids, bodies))


def assert_drained(queues: Any) -> None:
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)
    assert drain(queues.client, queues.dlq_url) == []


def env_for(queues: Any, dsn: str, **extra: str) -> dict[str, str]:
    base = {
        "PIPELINE_PIPELINE__PROGRESS_INTERVAL": "1",
        "PIPELINE_SQS__RECEIVERS": "4",
    }
    return pipeline_env(queues, dsn, KEY, **{**base, **extra})


def test_kill9_mid_drain_then_restart(queues, pg_dsn: str, clis) -> None:  # type: ignore[no-untyped-def]
    """kill -9 at a random point; a restart with --until-empty stores every event exactly once."""
    n = int(os.environ.get("KILL9_EVENTS", "3000"))
    seed = int(os.environ.get("KILL9_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    kill_at = rng.randint(n // 10, n * 6 // 10)
    print(f"kill -9 after {kill_at} of {n} rows (KILL9_SEED={seed})")
    bodies = sample_bodies(n, seed=seed)
    ids = send_all(queues.client, queues.queue_url, bodies)
    env = env_for(queues, pg_dsn, PIPELINE_SQS__VISIBILITY_TIMEOUT="5", PIPELINE_PIPELINE__BATCH_SIZE="50")

    first = clis(env, name="killed")
    wait_for(lambda: row_count(pg_dsn) >= kill_at or not first.alive, 120 + n / 50, "rows to arrive")
    assert first.alive, f"finished before the kill; stderr:\n{first.stderr[-2000:]}"
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    stored = row_count(pg_dsn)
    assert stored < n

    second = clis(env, "--until-empty", name="restart")
    assert second.wait(240 + n / 50) == 0, second.stderr[-3000:]
    summary = second.summary()
    assert summary["inserted"] <= n - stored and summary["rejected"] == 0
    assert_exactly_once(pg_dsn, ids, bodies)
    assert_drained(queues)


class TableLock:
    """Holds ``LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE`` from another connection until released."""

    def __init__(self, dsn: str) -> None:
        self._locked, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold(dsn)), daemon=True)
        self._thread.start()
        assert self._locked.wait(30), "could not lock the table"

    async def _hold(self, dsn: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE")
                self._locked.set()
                while not self._release.is_set():
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()

    def release(self) -> None:
        self._release.set()
        self._thread.join(30)


def started(cli: Cli) -> bool:
    assert cli.alive, cli.stderr[-3000:]
    return any(e.get("msg") == "pipeline started" for e in cli.logs())


def test_sigterm_while_the_database_is_stuck_releases_and_exits_0(queues, pg_dsn: str, clis) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM with a batch that cannot commit: after the grace period, held messages are released."""
    bodies = sample_bodies(1500, seed=11)
    env = env_for(queues, pg_dsn, PIPELINE_PIPELINE__GRACE_SECONDS="3", PIPELINE_PIPELINE__BATCH_SIZE="100")
    cli = clis(env)
    wait_for(lambda: started(cli), 60, "the pipeline to start")
    lock = TableLock(pg_dsn)  # after start-up: migration and the staging table need the table too
    try:
        ids = send_all(queues.client, queues.queue_url, bodies)
        wait_for(lambda: any(e.get("msg") == "progress" and e["received"] >= 500 for e in cli.logs()), 120, "messages to be held")
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.wait(60) == 0, cli.stderr[-3000:]
    finally:
        lock.release()
    summary = cli.summary()
    assert summary["inserted"] == 0 and summary["released"] == summary["received"] > 0, summary
    # Released means visible again at once, not after the 30 s visibility timeout.
    assert queue_counts(queues.client, queues.queue_url) == (1500, 0)
    assert any(e.get("msg") == "grace period over, releasing unfinished messages" for e in cli.logs())

    again = run_cli("run", "--until-empty", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(pg_dsn, ids, bodies)
    assert_drained(queues)


def test_sigterm_stops_polling_flushes_and_acks(queues, pg_dsn: str, clis) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM mid-stream: what was received is stored and deleted; nothing is left invisible."""
    bodies = sample_bodies(4000, seed=12)
    ids = send_all(queues.client, queues.queue_url, bodies)
    # The in-flight cap keeps receiving within 300 messages of the table, so a slow poll of the row count on a
    # loaded machine cannot let the run receive everything before the signal.
    env = env_for(queues, pg_dsn, PIPELINE_PIPELINE__BATCH_SIZE="100", PIPELINE_SQS__MAX_IN_FLIGHT="300")
    cli = clis(env)
    wait_for(lambda: row_count(pg_dsn) >= 500 or not cli.alive, 120, "rows to arrive")
    cli.proc.send_signal(signal.SIGTERM)
    assert cli.wait(60) == 0, cli.stderr[-3000:]
    summary = cli.summary()
    assert summary["received"] < len(bodies), "stopped too late to test anything"
    assert summary["inserted"] == summary["acked"] == summary["received"] and summary["released"] == 0, summary
    # No receive call was cut off: no message is left invisible (the visibility timeout is 30 s).
    visible, in_flight = queue_counts(queues.client, queues.queue_url)
    assert (visible, in_flight) == (len(bodies) - summary["received"], 0)
    assert row_count(pg_dsn) == summary["inserted"]

    again = run_cli("run", "--until-empty", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_exactly_once(pg_dsn, ids, bodies)
    assert_drained(queues)


def progress(cli: Cli) -> list[dict]:
    return [e for e in cli.logs() if e.get("msg") == "progress"]


def assert_under_cap(cli: Cli, max_in_flight: int) -> None:
    """Received-but-not-acked messages never exceeded the in-flight cap."""
    lines = progress(cli)
    assert lines and max(e["held"] for e in lines) <= max_in_flight
    assert all(e["received"] - e["acked"] <= max_in_flight for e in lines)


def assert_polling_paused(cli: Cli, max_in_flight: int) -> None:
    """While the sink could not write, held messages stayed under the cap and receiving stopped."""
    assert_under_cap(cli, max_in_flight)
    received = [e["received"] for e in progress(cli)]
    longest, run = 1, 1
    for a, b in zip(received, received[1:]):
        run = run + 1 if a == b and b < cli.summary()["received"] else 1
        longest = max(longest, run)
    assert longest >= 3, received


def test_postgres_down_10s_mid_run(queues, pg_dsn: str, postgres, clis) -> None:  # type: ignore[no-untyped-def]
    """The sink retries with backoff, polling pauses under the in-flight cap, and all lands once."""
    bodies = sample_bodies(4000, seed=13)
    ids = send_all(queues.client, queues.queue_url, bodies)
    dsn = tcp_dsn(postgres, pg_dsn)
    env = env_for(queues, dsn, PIPELINE_PIPELINE__BATCH_SIZE="100", PIPELINE_SQS__MAX_IN_FLIGHT="300",
                  PIPELINE_SQS__VISIBILITY_TIMEOUT="6")
    cli = clis(env, "--until-empty")
    wait_for(lambda: row_count(pg_dsn) >= 300 or not cli.alive, 120, "rows to arrive")
    assert cli.alive, cli.stderr[-3000:]
    try:
        postgres.stop()
        time.sleep(10)
        assert cli.alive, cli.stderr[-3000:]
    finally:
        postgres.start()
    assert cli.wait() == 0, cli.stderr[-3000:]

    summary = cli.summary()
    retries = [e for e in cli.logs() if e.get("msg") == "database write failed, retrying"]
    # One backoff shared by the batches under way: the writes under way at the cut fail once each, then a probe a step.
    assert 0 < summary["errors"]["postgres"] == len(retries) <= 20, summary
    assert summary["outages"]["postgres"] >= 1, summary
    assert summary["visibility_extended"] > 0  # held messages did not time out meanwhile
    assert_polling_paused(cli, 300)
    assert_exactly_once(pg_dsn, ids, bodies)
    assert_drained(queues)
    assert PG_PASSWORD not in cli.stdout + cli.stderr


def test_sqs_unreachable_10s_mid_run(queues, pg_dsn: str, clis) -> None:  # type: ignore[no-untyped-def]
    """Receivers and acker back off while SQS is cut off, then recover; all lands once."""
    bodies = sample_bodies(4000, seed=14)
    ids = send_all(queues.client, queues.queue_url, bodies)
    with TcpProxy.to_url(queues.endpoint) as proxy:
        # Only the endpoint goes through the proxy: botocore sends every call to it, whatever the queue URL says.
        env = env_for(queues, pg_dsn, PIPELINE_SQS__ENDPOINT_URL=proxy.endpoint, PIPELINE_PIPELINE__BATCH_SIZE="100",
                      PIPELINE_SQS__MAX_IN_FLIGHT="300", PIPELINE_SQS__VISIBILITY_TIMEOUT="6")
        cli = clis(env, "--until-empty")
        wait_for(lambda: row_count(pg_dsn) >= 100 or not cli.alive, 120, "rows to arrive")
        assert cli.alive, cli.stderr[-3000:]
        proxy.block()
        time.sleep(10)
        assert cli.alive, cli.stderr[-3000:]
        stalled = row_count(pg_dsn)
        proxy.unblock()
        assert stalled < len(bodies)
        assert cli.wait() == 0, cli.stderr[-3000:]

    summary = cli.summary()
    warnings = [e for e in cli.logs() if e.get("level") == "warning"]
    # One shared backoff, not one per caller: the calls under way at the cut fail once each, then one probe a step.
    assert 0 < summary["errors"]["sqs"] <= 150 and len(warnings) <= 150, summary
    assert summary["outages"]["sqs"] >= 1, summary
    assert summary["received"] == summary["inserted"] + summary["duplicates"]
    assert_under_cap(cli, 300)
    assert_exactly_once(pg_dsn, ids, bodies)
    assert_drained(queues)


def test_batch_held_longer_than_the_visibility_timeout(queues, pg_dsn: str, clis) -> None:  # type: ignore[no-untyped-def]
    """A table lock holds the batch 3x the visibility timeout: the heartbeat keeps the messages hidden."""
    bodies = sample_bodies(600, seed=15)
    env = env_for(queues, pg_dsn, PIPELINE_SQS__VISIBILITY_TIMEOUT="4", PIPELINE_PIPELINE__BATCH_SIZE="100")
    cli = clis(env)  # not --until-empty: it could see the queue empty before the messages are sent
    wait_for(lambda: started(cli), 60, "the pipeline to start")
    lock = TableLock(pg_dsn)
    try:
        ids = send_all(queues.client, queues.queue_url, bodies)
        time.sleep(12)
        assert cli.alive, cli.stderr[-3000:]
    finally:
        lock.release()
    wait_for(lambda: row_count(pg_dsn) == len(bodies) and queue_counts(queues.client, queues.queue_url) == (0, 0),
             120, "the batch to commit and be acked", interval=0.5)
    cli.proc.send_signal(signal.SIGTERM)
    assert cli.wait() == 0, cli.stderr[-3000:]
    summary = cli.summary()
    assert summary["visibility_extended"] > 0, summary
    # Extended in time, nothing came back; had it, the copy would be a counted, acked duplicate.
    assert summary["received"] == summary["inserted"] + summary["duplicates"] == summary["acked"], summary
    assert summary["inserted"] == len(bodies)
    assert_exactly_once(pg_dsn, ids, bodies)
    assert_drained(queues)


def test_three_instances_share_one_queue(queues, pg_dsn: str, clis) -> None:  # type: ignore[no-untyped-def]
    bodies = sample_bodies(4500, seed=16)
    ids = send_all(queues.client, queues.queue_url, bodies)
    env = env_for(queues, pg_dsn, PIPELINE_PIPELINE__BATCH_SIZE="200", PIPELINE_SQS__VISIBILITY_TIMEOUT="10")
    instances = [clis(env, "--until-empty", name=f"instance{i}") for i in range(3)]
    for cli in instances:
        assert cli.wait() == 0, cli.stderr[-3000:]
    summaries = [cli.summary() for cli in instances]
    assert sum(s["inserted"] for s in summaries) == len(bodies), summaries
    assert_exactly_once(pg_dsn, ids, bodies)
    assert_drained(queues)
