"""Nothing the pipeline writes may contain a raw ip, a raw device_id, the masking key or a DSN password;
``unmask`` can only read the configured table, and only canonical tokens unmask.

Scanned: the CLI's stdout and stderr (summary, JSON logs, errors), ``/metrics``, ``/readyz`` and
``/healthz``, the DLQ's reason attributes, and ``check``'s report. Bodies in the DLQ are the
original messages by design and are not scanned.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import shutil
import signal
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import orjson
import pytest

from pipeline.pii.unmask import Refused, unmask_command
from pipeline.sample import sample_bodies
from pipeline.schema import migrate
from pipeline.settings import Settings
from stages.masking import Masker, generate_key, parse_key
from stages.transform import normalise_ip
from tests.e2e.corpus import BAD, ODD
from tests.e2e.support import PG_PASSWORD, Cli, row_count, tcp_dsn, wait_for
from tests.helpers import drain, fetch, pipeline_env, queue_counts, run_cli, send_bodies
from tests.services import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = generate_key("sec").encode()
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
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


# --- unmask --query: only a read of the configured table --------------------------------------

RAW = [("u1", "203.0.113.9", "812-55-1234"), ("u2", "198.51.100.7", "555-12-0001"), ("u3", "2001:db8::5", "999-00-1111")]
NO_SQS = SimpleNamespace(endpoint="http://127.0.0.1:9", queue_url="http://127.0.0.1:9/000000000000/none",
                         dlq_url="http://127.0.0.1:9/000000000000/none-dlq")


def _seed(dsn: str) -> Masker:
    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn, "user_logins")
            await conn.executemany(
                "INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, locale, app_version,"
                " create_date) VALUES ($1, 'ios', $2, $3, 'US', '2.3.0', $4)",
                [(u, masker.mask(ip), masker.mask(dev), dt.date(2024, 1, 1 + i)) for i, (u, ip, dev) in enumerate(RAW)])
        finally:
            await conn.close()

    masker = Masker([parse_key(KEY)])
    asyncio.run(go())
    return masker


def _unmask(settings: Settings, values: tuple[str, ...] = (), **options: object) -> int:
    args = argparse.Namespace(**{"values": list(values), "query": None, "where": None, "columns": None, "limit": None,
                                 **options})
    return asyncio.run(unmask_command(settings, args))


def _audits(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def attack_dir() -> Iterator[Path]:
    """A directory the database server's OS user may write to (it runs as another user under root)."""
    path = Path(tempfile.mkdtemp(prefix="unmask-attack-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_unmask_query_refuses_every_attack_before_it_reaches_the_database(
        pg_dsn: str, tmp_path: Path, attack_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _seed(pg_dsn)
    marker, out_file = attack_dir / "program-ran", attack_dir / "copied.csv"
    # The DSN is a superuser's: sent as is, these statements would run a program and write files.
    fetch(pg_dsn, f"COPY (SELECT 1) TO PROGRAM 'touch {attack_dir}/control'")
    assert (attack_dir / "control").exists()
    audit_file = tmp_path / "audit.jsonl"
    settings = Settings(postgres={"dsn": pg_dsn}, masking={"key": KEY, "audit_log": str(audit_file)},
                        pipeline={"state_dir": tmp_path / "state"})
    attacks = [
        (f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'", "not COPY"),
        (f"COPY (DELETE FROM user_logins RETURNING 1) TO PROGRAM 'touch {marker}'", "not COPY"),
        (f"COPY user_logins TO '{out_file}'", "not COPY"),
        (f"SELECT * FROM user_logins; COPY (SELECT 1) TO PROGRAM 'touch {marker}'", "';' is not accepted"),
        (f"SELECT * FROM user_logins WHERE user_id = 'x'; DELETE FROM user_logins; --", "';' is not accepted"),
        ("DELETE FROM user_logins", "not DELETE"),
        ("WITH d AS (DELETE FROM user_logins RETURNING *) SELECT * FROM d", "not WITH"),
        ("SELECT pg_read_file('/etc/hostname') FROM user_logins", "function calls are not accepted: pg_read_file"),
        (f"SELECT lo_export(lo_import('/etc/hostname'), '{out_file}') FROM user_logins", "function calls"),
        ("SELECT * FROM user_logins WHERE user_id IN (SELECT dblink_exec('dbname=postgres', 'SELECT 1'))", "subqueries"),
        ("SELECT * FROM user_logins WHERE pg_terminate_backend(pg_backend_pid()) IS NULL", "function calls"),
        ("SELECT set_config('role', 'postgres', false) FROM user_logins", "function calls are not accepted: set_config"),
        ("SELECT * FROM user_logins WHERE user_id = $$x$$", "'$'"),
        ("SELECT * FROM user_logins WHERE user_id = E'\\x27'", "prefixed string literals"),
        ("SELECT * FROM user_logins WHERE user_id::text = 'u1'", "casts"),
        ("SELECT * FROM user_logins /* hidden */", "comments"),
        ("SELECT * FROM pg_authid", "only the configured table user_logins can be read"),
        ("SELECT * FROM user_logins UNION SELECT * FROM user_logins", "got UNION"),
        ("SELECT * FROM user_logins WHERE current_user = 'postgres'", "has no column current_user"),
    ]
    for sql, reason in attacks:
        with pytest.raises(Refused) as err:
            _unmask(settings, query=sql)
        assert str(err.value).startswith("--query refused: ") and reason in str(err.value), (sql, str(err.value))
    with pytest.raises(Refused, match="';' is not accepted"):
        _unmask(settings, where=f"user_id = 'x'; COPY (SELECT 1) TO PROGRAM 'touch {marker}'")
    with pytest.raises(Refused, match="function calls are not accepted: pg_read_file"):
        _unmask(settings, where="user_id = 'x'", columns="user_id, pg_read_file('/etc/hostname')")

    assert capsys.readouterr().out == ""  # nothing revealed
    assert row_count(pg_dsn) == len(RAW)  # nothing deleted
    assert sorted(p.name for p in attack_dir.iterdir()) == ["control"]  # no program ran, no file written
    records = _audits(audit_file)
    assert len(records) == len(attacks) + 2
    assert all(r["outcome"] == "refused" and r["reason"].startswith("query refused: ") for r in records)
    assert [r["mode"] for r in records] == ["query"] * len(attacks) + ["where"] * 2
    assert records[0]["query_sha256"] == hashlib.sha256(attacks[0][0].encode()).hexdigest()
    assert all(sql not in orjson.dumps(r).decode() for r, (sql, _) in zip(records, attacks))  # no query text


def test_unmask_query_reads_with_the_readme_example_and_a_recovery_role(
        pg_dsn: str, tmp_path: Path) -> None:
    masker = _seed(pg_dsn)
    role = f"rec_{uuid.uuid4().hex[:8]}"
    fetch(pg_dsn, f"CREATE ROLE {role} LOGIN")
    fetch(pg_dsn, f"GRANT SELECT ON user_logins TO {role}")  # the README's recovery role: nothing else
    env = pipeline_env(NO_SQS, pg_dsn, KEY, PIPELINE_PIPELINE__STATE_DIR=str(tmp_path / "state"))
    readme = ("SELECT user_id, create_date, masked_ip, masked_device_id FROM user_logins WHERE user_id = 'u2'")

    out = run_cli("unmask", "--query", readme, env=env, timeout=60)  # as the superuser: works, with a warning
    assert out.returncode == 0, out.stderr[-2000:]
    assert [orjson.loads(line) for line in out.stdout.splitlines()] == [
        {"user_id": "u2", "create_date": "2024-01-02", "masked_ip": "198.51.100.7", "masked_device_id": "555-12-0001"}]
    logs = [orjson.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    warnings = [entry for entry in logs if entry["level"] == "warning"]
    assert len(warnings) == 1 and "superuser" in warnings[0]["msg"] and "recovery_dsn" in warnings[0]["msg"]
    (record,) = [entry for entry in logs if entry["logger"] == "pipeline.audit"]
    assert record["outcome"] == "ok" and record["rows"] == 1 and record["count"] == 2

    recovery = {**env, "PIPELINE_POSTGRES__RECOVERY_DSN": pg_dsn.replace("postgres@", f"{role}@", 1)}
    out = run_cli("unmask", "--where", "create_date >= '2024-01-02' AND (user_id LIKE 'u%' OR locale IS NULL)",
                  "--columns", "user_id,masked_ip", "--limit", "5", env=recovery, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(out.stdout.splitlines()) == [
        '{"user_id":"u2","masked_ip":"198.51.100.7"}', '{"user_id":"u3","masked_ip":"2001:db8::5"}']
    assert '"level":"warning"' not in out.stderr
    out = run_cli("unmask", "--query", "SELECT * FROM user_logins ORDER BY create_date DESC LIMIT 1", env=recovery,
                  timeout=60)
    assert out.returncode == 0 and orjson.loads(out.stdout)["masked_device_id"] == "999-00-1111"

    # Refused on the command line: one error line, exit 1, audited with the reason, the table untouched.
    out = run_cli("unmask", "--query", "COPY (SELECT 1) TO PROGRAM 'touch /tmp/never'", env=env, timeout=60)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and out.stdout == "" and "Traceback" not in out.stderr
    assert errors == ["error: --query refused: only SELECT <columns>|* FROM user_logins [WHERE …] [ORDER BY …] "
                      "[LIMIT n] is accepted, not COPY"]
    (record,) = [orjson.loads(line) for line in out.stderr.splitlines() if '"pipeline.audit"' in line]
    assert record["outcome"] == "refused" and record["reason"].startswith("query refused: only SELECT")
    assert row_count(pg_dsn) == len(RAW) and masker.mask("198.51.100.7") in str(fetch(pg_dsn, "TABLE user_logins"))


# --- tokens have one spelling ------------------------------------------------------------------


def test_non_canonical_tokens_are_refused_as_forgeries(pg_dsn: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    masker = _seed(pg_dsn)
    audit_file = tmp_path / "audit.jsonl"
    settings = Settings(postgres={"dsn": pg_dsn}, masking={"key": KEY, "audit_log": str(audit_file)},
                        pipeline={"state_dir": tmp_path / "state"})
    good = masker.mask("198.51.100.7")  # 28 bytes: 4 spare bits in the last character
    body = good.split(".", 1)[1]
    lenient = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    twins = [good[:-1] + c for c in ALPHABET if c != good[-1]
             and base64.urlsafe_b64decode(body[:-1] + c + "=" * (-len(body) % 4)) == lenient]
    assert len(twins) == 15
    with_dash = next(t for t in (masker.mask(f"10.1.1.{i}") for i in range(100)) if "-" in t[4:] or "_" in t[4:])
    others = [good + "=", good + "==", good + " ", good + "\t", good[:8] + " " + good[8:],
              "sec." + with_dash[4:].replace("-", "+").replace("_", "/")]
    for bad in twins + others:
        with pytest.raises(Refused) as err:
            _unmask(settings, (good, good, bad))
        assert str(err.value) == "value #3 does not decrypt under key 'sec' (corrupt or forged)", repr(bad)
    assert _unmask(settings, (good,)) == 0 and capsys.readouterr().out == "198.51.100.7\n"
    records = _audits(audit_file)
    assert [r["outcome"] for r in records] == ["refused"] * (len(twins) + len(others)) + ["ok"]
    assert {r["reason"] for r in records[:-1]} == {"value #3: corrupt or forged token"}
    assert all("error" not in r and "KeyError_" not in orjson.dumps(r).decode() for r in records)

    # A twin stored in the table is refused too, by row and column; nothing is printed.
    fetch(pg_dsn, "UPDATE user_logins SET masked_ip = $1 WHERE user_id = 'u3'", twins[0])
    with pytest.raises(Refused, match=r"^row #3 masked_ip does not decrypt under key 'sec' \(corrupt or forged\)$"):
        _unmask(settings, query="SELECT user_id, masked_ip FROM user_logins ORDER BY user_id")
    assert capsys.readouterr().out == ""
    assert _audits(audit_file)[-1]["reason"] == "row #3 masked_ip: corrupt or forged token"

    out = run_cli("unmask", good, twins[3], env=pipeline_env(NO_SQS, pg_dsn, KEY), timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [
        "error: value #2 does not decrypt under key 'sec' (corrupt or forged)"]
