"""``processes = 2`` when a worker is killed mid-run: logged at once, replaced, counted, and the
run still drains the queue with every message stored exactly once. Real LocalStack and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import asyncpg
import orjson

from stages.masking import generate_key
from tests.helpers import REPO, fetch, pipeline_env, process_alive, queue_counts, run_cli

KEY = generate_key("work").encode()


def stored(dsn: str) -> int:
    try:
        return fetch(dsn, "SELECT count(*) AS n FROM user_logins")[0]["n"]
    except asyncpg.UndefinedTableError:  # not migrated yet
        return 0


def log_entries(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert proc.poll() is None, f"run exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s"
        time.sleep(0.1)


def test_a_worker_killed_mid_run_is_logged_replaced_and_the_queue_still_drains(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    # a short visibility timeout: the killed worker's messages come back soon
    env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_PIPELINE__PROCESSES="2", PIPELINE_SQS__VISIBILITY_TIMEOUT="4")
    sent = run_cli("loadgen", "--count", "6000", "--invalid-ratio", "0.02", "--seed", "23", env=env)
    assert sent.returncode == 0, sent.stderr[-2000:]
    valid = 6000 - orjson.loads(sent.stdout.strip().splitlines()[-1])["invalid"]

    with tempfile.NamedTemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--until-empty"], cwd=REPO, env=env,
                                stdout=out, stderr=err, text=True)
        try:
            def pids() -> list[int]:
                err.seek(0)
                return next((e["pids"] for e in log_entries(err.read()) if e["msg"] == "workers started"), [])

            victim = wait_for("worker pids", pids, 60, proc)[0]
            wait_for("rows", lambda: stored(pg_dsn) >= 300, 120, proc)
            os.kill(victim, signal.SIGKILL)  # mid-run: most of the 6,000 are still to come
            assert proc.wait(timeout=300) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        out.seek(0)
        logs, stdout = err.read(), out.read()
    entries = log_entries(logs)
    died = [e for e in entries if e["msg"] == "worker died"]
    assert len(died) == 1, logs[-3000:]
    assert died[0]["level"] == "error" and died[0]["worker"] == 0 and died[0]["pid"] == victim
    assert died[0]["exit"] == "SIGKILL" and died[0]["exitcode"] == -signal.SIGKILL
    assert any(e["msg"] == "worker started" and e["worker"] == 0 and e["pid"] != victim for e in entries)

    summary = orjson.loads(stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["worker_restarts"] == 1 and summary["worker_deaths"] == 1
    # every incarnation counted: the killed one up to its last snapshot, so at most the real numbers
    assert 0 < summary["inserted"] <= valid and summary["acked"] <= 6000
    rows = fetch(pg_dsn, "SELECT count(*) AS n, count(DISTINCT message_id) AS ids FROM user_logins")[0]
    assert rows["n"] == rows["ids"] == valid  # every valid message stored, exactly once
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)


def test_workers_stop_when_the_parent_is_killed(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    # kill -9 of the parent: no one forwards signals any more, so each worker sees its parent's
    # sentinel close, drains, releases what it holds and exits: none keeps consuming on its own
    env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_PIPELINE__PROCESSES="2", PIPELINE_PIPELINE__GRACE_SECONDS="2")
    with tempfile.NamedTemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            def pids() -> list[int]:
                err.seek(0)
                return next((e["pids"] for e in log_entries(err.read()) if e["msg"] == "workers started"), [])

            workers = wait_for("worker pids", pids, 60, proc)
            proc.kill()
            proc.wait()
            deadline = time.monotonic() + 60
            while any(process_alive(p) for p in workers):
                assert time.monotonic() < deadline, "a worker outlived its parent"
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        assert "the parent process is gone" in err.read()
