"""Helpers for the end-to-end fault, hostile-input and security tests (real services only)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from tests.helpers import REPO, fetch


class Cli:
    """A ``python -m pipeline run`` subprocess; output goes to files (a full pipe would block it)."""

    def __init__(self, tmp: Path, env: dict[str, str], *args: str, name: str = "run") -> None:
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", *args], cwd=REPO, env=env, stdout=out, stderr=err,
                stdin=subprocess.DEVNULL,
            )

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"pipeline did not exit within {timeout}s; stderr tail:\n{self.stderr[-3000:]}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def summary(self) -> dict:
        lines = self.stdout.strip().splitlines()
        assert lines, f"no summary on stdout; stderr tail:\n{self.stderr[-3000:]}"
        return orjson.loads(lines[-1])

    def logs(self) -> list[dict]:
        out = []
        for line in self.stderr.splitlines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                pass
        return out

    def stop(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait()


def send_all(client: Any, queue_url: str, bodies: list[str], threads: int = 8) -> list[str]:
    """Send ``bodies`` (in parallel batches of 10); return their SQS message ids, in order."""

    def batch(i: int) -> list[str]:
        chunk = bodies[i : i + 10]
        resp = client.send_message_batch(
            QueueUrl=queue_url, Entries=[{"Id": str(j), "MessageBody": b} for j, b in enumerate(chunk)])
        assert not resp.get("Failed"), resp["Failed"]
        ids = {int(e["Id"]): e["MessageId"] for e in resp["Successful"]}
        return [ids[j] for j in range(len(chunk))]

    with ThreadPoolExecutor(threads) as ex:
        return [mid for ids in ex.map(batch, range(0, len(bodies), 10)) for mid in ids]


def row_count(dsn: str) -> int:
    try:
        return int(fetch(dsn, "SELECT count(*) AS n FROM user_logins")[0]["n"])
    except asyncpg.UndefinedTableError:
        return 0


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval)


PG_PASSWORD = "s3cret-pw-8c1f"  # trust auth ignores it; it must never be printed


def tcp_dsn(postgres: Any, pg_dsn: str) -> str:
    """The test database over TCP, with a password in the DSN (to check that it is redacted)."""
    db = pg_dsn.split("/", 3)[3].split("?", 1)[0]
    return postgres.url(db, tcp=True).replace("postgres@", f"postgres:{PG_PASSWORD}@", 1)
