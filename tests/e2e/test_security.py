"""Nothing the pipeline writes may contain a raw ip, a raw device_id, the masking key or a DSN password.

Scanned: the CLI's stdout and stderr (summary, JSON logs, errors), ``/metrics``, ``/readyz`` and
``/healthz``, the DLQ's reason attributes, and ``check``'s report. Bodies in the DLQ are the
original messages by design and are not scanned.
"""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from pipeline.sample import sample_bodies
from stages.masking import generate_key
from stages.transform import normalise_ip
from tests.e2e.corpus import BAD, ODD
from tests.e2e.support import PG_PASSWORD, Cli, row_count, tcp_dsn, wait_for
from tests.helpers import drain, fetch, pipeline_env, queue_counts, run_cli, send_bodies
from tests.services import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = generate_key("sec").encode()
GENERIC = {"0.0.0.0", "127.0.0.1", "::", "::1"}  # addresses that may legitimately appear (listen addresses)


def secrets_of(bodies: list[str]) -> set[str]:
    """Raw and normalised ips and raw device ids of every body that has them, plus the key material."""
    out = {KEY.split(":", 1)[1], PG_PASSWORD}
    for body in bodies:
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        for field in ("ip", "device_id"):
            value = event.get(field)
            if isinstance(value, str) and len(value.strip()) >= 6 and value.strip() not in GENERIC:
                out.add(value.strip())
        try:
            out.add(normalise_ip(event["ip"]))
        except (KeyError, TypeError, ValueError):
            pass
    return out - GENERIC


def scrape(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:  # /readyz may say 503; its body is scanned all the same
        return exc.read().decode()


def test_nothing_written_contains_pii_keys_or_passwords(queues, pg_dsn: str, postgres, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bodies = sample_bodies(400, seed=51) + [c.body for c in [*BAD, *ODD]]
    send_bodies(queues.client, queues.queue_url, bodies)
    port = free_port()
    env = pipeline_env(queues, tcp_dsn(postgres, pg_dsn), KEY, PIPELINE_HTTP__PORT=str(port),
                       PIPELINE_HTTP__HOST="127.0.0.1", PIPELINE_PIPELINE__PROGRESS_INTERVAL="1")
    assert run_cli("migrate", env=env).returncode == 0
    # A database-side rejection too, so its reason (the server's message) is scanned.
    fetch(pg_dsn, "ALTER TABLE user_logins ADD CONSTRAINT no_max CHECK (length(user_id) < 128)")

    cli = Cli(tmp_path, env, name="scan")
    try:
        expected_rows = 400 + len(ODD) - 1  # the 128-character user id is refused by the constraint
        wait_for(lambda: row_count(pg_dsn) >= expected_rows and queue_counts(queues.client, queues.queue_url) == (0, 0),
                 180, "the pipeline to drain", interval=0.5)
        served = [scrape(port, p) for p in ("/metrics", "/readyz", "/healthz")]
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.wait(60) == 0, cli.stderr[-3000:]
    finally:
        cli.stop()
    assert "pipeline_" in served[0]  # it is the metrics page, with counters

    dead = drain(queues.client, queues.dlq_url)
    assert len(dead) == len(BAD) + 1
    reasons = [f"{k}={v.get('StringValue')}" for m in dead for k, v in m["MessageAttributes"].items()]
    assert any("db.23514" in r for r in reasons)
    check = run_cli("check", env=env)

    texts = {"stdout": cli.stdout, "stderr": cli.stderr, "metrics": served[0], "readyz": served[1],
             "healthz": served[2], "dlq attributes": "\n".join(reasons), "check": check.stdout + check.stderr}
    secrets = secrets_of(bodies)
    assert len(secrets) > 100 and any(s in m["Body"] for m in dead for s in secrets)  # the scan can see them
    leaks = {(where, s[:40]) for where, text in texts.items() for s in secrets if s in text}
    assert not leaks
    assert "postgres:***@" in check.stdout  # the DSN is printed, redacted


def test_dsn_passwords_are_redacted_in_cli_errors(queues) -> None:  # type: ignore[no-untyped-def]
    """However the password is written (or mistyped), `run` and `check` never print it."""
    secret = "Tr0ub4dor"
    dsns = [
        f"postgresql://postgres:{secret}@127.0.0.1:9/x",
        f"postgresql://postgres:p@ss{secret}@127.0.0.1:9/x",  # unescaped '@': drivers misread it as the host
        f"postgresql://postgres:pa/{secret}@127.0.0.1:9/x",  # unescaped '/'
        f"postgresql://postgres@127.0.0.1:9/x?password={secret}",
        f"host=127.0.0.1 port=9 password={secret}",
    ]
    for dsn in dsns:
        env = pipeline_env(queues, dsn, KEY)
        for command in (["run", "--until-empty"], ["check"]):
            out = run_cli(*command, env=env, timeout=60)
            assert out.returncode != 0, (command, dsn)
            assert secret not in out.stdout + out.stderr, (command, dsn, out.stdout + out.stderr)
            assert "Traceback" not in out.stderr
