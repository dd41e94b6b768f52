"""PII lifecycle end to end: key rotation + rekey, KMS-wrapped keys, audited unmask.

Real LocalStack (SQS, KMS) and PostgreSQL; the CLI runs as a subprocess, as an operator
would run it.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from pathlib import Path

import asyncpg
import boto3
import orjson
import pytest

from pipeline.keyring import load_masker
from pipeline.schema import migrate
from pipeline.settings import Settings
from stages.masking import Masker, generate_key
from tests.helpers import fetch, pipeline_env, queue_counts, run_cli, send_bodies

pytestmark = pytest.mark.e2e

K1, K2 = generate_key("k1"), generate_key("k2")
RNG = random.Random(6)
IPS = [f"{RNG.randint(1, 223)}.{RNG.randint(0, 255)}.{RNG.randint(0, 255)}.{RNG.randint(1, 254)}" for _ in range(10)]
IPS += [f"2001:db8::{RNG.randint(1, 0xFFFF):x}" for _ in range(4)]
DEVICES = [f"{RNG.randint(100, 999)}-{RNG.randint(10, 99)}-{RNG.randint(1000, 9999)}" for _ in range(12)]


def events(n: int, seed: int) -> list[dict]:
    """Login events drawing from shared ip/device pools, so batches repeat each other's values."""
    rng = random.Random(seed)
    return [{"user_id": str(uuid.UUID(int=rng.getrandbits(128))), "app_version": "2.3.0", "device_type": "ios",
             "ip": rng.choice(IPS), "locale": "US", "device_id": rng.choice(DEVICES)} for _ in range(n)]


def send(queues, evs: list[dict]) -> None:  # type: ignore[no-untyped-def]
    send_bodies(queues.client, queues.queue_url, [orjson.dumps(e).decode() for e in evs])


def run_pipeline(env: dict[str, str]) -> dict:
    out = run_cli("run", "--until-empty", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return orjson.loads(out.stdout.strip().splitlines()[-1])


def cli_json(*args: str, env: dict[str, str], input: str | None = None) -> dict:
    out = run_cli(*args, env=env, input=input)
    assert out.returncode == 0, out.stderr[-3000:]
    return orjson.loads(out.stdout.strip().splitlines()[-1])


def one_error(out) -> str:  # type: ignore[no-untyped-def]
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return errors[0]


def audit_lines(stderr: str) -> list[dict]:
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "pipeline.audit"]


def rotated_env(queues, dsn: str, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """k2 active, k1 kept in the ring (as an operator rotates)."""
    return pipeline_env(queues, dsn, K2.encode(), PIPELINE_MASKING__KEYS=K1.encode(), **extra)


def test_rotation_round_trip(queues, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Write under k1, rotate to k2, rekey: originals unmask and duplicates stay detectable."""
    before = events(40, seed=1)
    send(queues, before)
    assert run_pipeline(pipeline_env(queues, pg_dsn, K1.encode()))["inserted"] == 40
    old_rows = fetch(pg_dsn, "SELECT user_id, masked_ip, masked_device_id FROM user_logins")
    assert all(r["masked_ip"].startswith("k1.") and r["masked_device_id"].startswith("k1.") for r in old_rows)
    old_token = old_rows[0]["masked_ip"]

    env = rotated_env(queues, pg_dsn, PIPELINE_MASKING__AUDIT_LOG=str(tmp_path / "audit.jsonl"))
    plan = cli_json("rekey", "--dry-run", env=env)
    assert plan["rows_pending_at_start"] == 40 and plan["rows_updated"] == 0
    assert plan["values_by_key_id_at_start"] == {"k1": {"masked_ip": 40, "masked_device_id": 40}}
    assert fetch(pg_dsn, "SELECT count(*) AS n FROM user_logins WHERE masked_ip LIKE 'k1.%'")[0]["n"] == 40

    report = cli_json("rekey", "--batch-size", "16", env=env)
    assert report["active_key_id"] == "k2" and report["complete"] and report["rows_updated"] == 40
    assert report["values_rekeyed"] == {"k1": {"masked_ip": 40, "masked_device_id": 40}}
    assert report["batches"] == 3 and report["rows_skipped_not_tokens"] == 0

    # New events after the rotation, repeating the same ips and device ids.
    after = events(40, seed=2)
    send(queues, after)
    assert run_pipeline(env)["inserted"] == 40
    rows = fetch(pg_dsn, "SELECT user_id, masked_ip, masked_device_id FROM user_logins")
    assert len(rows) == 80
    assert all(r["masked_ip"].startswith("k2.") and r["masked_device_id"].startswith("k2.") for r in rows)

    # Same raw value -> one token across the rotation, equal to a fresh k2 mask.
    fresh = Masker([K2])
    by_user = {r["user_id"]: r for r in rows}
    ip_tokens: dict[str, set[str]] = {}
    for e in before + after:
        r = by_user[e["user_id"]]
        assert r["masked_ip"] == fresh.mask(e["ip"]) and r["masked_device_id"] == fresh.mask(e["device_id"])
        ip_tokens.setdefault(e["ip"], set()).add(r["masked_ip"])
    assert all(len(t) == 1 for t in ip_tokens.values())
    shared = {e["ip"] for e in before} & {e["ip"] for e in after}
    assert shared, "the two batches should share ips"
    dupes = fetch(pg_dsn, "SELECT masked_ip, count(*) AS n FROM user_logins GROUP BY masked_ip")
    counts = {fresh.unmask(r["masked_ip"]): r["n"] for r in dupes}
    for ip in shared:
        assert counts[ip] == sum(e["ip"] == ip for e in before + after)

    # unmask --query gives back the originals of every row.
    out = run_cli("unmask", "--query", "SELECT user_id, masked_ip, masked_device_id FROM user_logins", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    got = {r["user_id"]: r for r in map(orjson.loads, out.stdout.splitlines())}
    assert len(got) == 80
    for e in before + after:
        assert (got[e["user_id"]]["masked_ip"], got[e["user_id"]]["masked_device_id"]) == (e["ip"], e["device_id"])
    (line,) = audit_lines(out.stderr)
    assert line["mode"] == "query" and line["count"] == 160 and line["key_ids"] == {"k2": 160} and line["rows"] == 80

    # A value from before the rotation still unmasks with k1 in the ring; without k1 it is refused.
    out = run_cli("unmask", old_token, env=env)
    assert out.returncode == 0 and out.stdout.strip() == Masker([K1]).unmask(old_token)
    error = one_error(run_cli("unmask", old_token, env=pipeline_env(queues, pg_dsn, K2.encode())))
    assert "no key with id 'k1'" in error

    # Idempotent: nothing left to do.
    again = cli_json("rekey", env=env)
    assert again["rows_updated"] == 0 and again["complete"] and again["batches"] == 0
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)


async def _seed(dsn: str, n: int) -> None:
    """Rows as the pipeline writes them under k1, plus pre-pipeline rows of the takehome."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, "user_logins")
        m = Masker([K1])
        rows = [(f"u{i}", "ios", m.mask(IPS[i % len(IPS)]), m.mask(DEVICES[i % len(DEVICES)]), "US", "2.3.0",
                 f"m-{i:04d}") for i in range(n)]
        legacy = [(f"old{i}", "android", hashlib.sha256(f"ip{i}".encode()).hexdigest(),
                   hashlib.sha256(f"dev{i}".encode()).hexdigest(), None, "2", None) for i in range(3)]
        by_hand = [(f"hand{i}", "ios", m.mask("10.0.0.%d" % i), m.mask("dev-%d" % i), None, "1", None) for i in range(2)]
        await conn.executemany(
            "INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, locale, app_version, message_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)", rows + legacy + by_hand)
    finally:
        await conn.close()


def test_rekey_is_resumable_idempotent_and_skips_legacy_rows(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(_seed(pg_dsn, 55))
    legacy_before = fetch(pg_dsn, "SELECT * FROM user_logins WHERE user_id LIKE 'old%' ORDER BY user_id")
    env = rotated_env(queues, pg_dsn)

    first = cli_json("rekey", "--batch-size", "10", "--max-batches", "2", env=env)
    assert first["rows_pending_at_start"] == 57 and first["rows_updated"] == 20
    assert not first["complete"] and first["rows_remaining"] == 37 and first["batches"] == 2
    assert first["rows_skipped_not_tokens"] == 3
    assert fetch(pg_dsn, "SELECT count(*) AS n FROM user_logins WHERE masked_ip LIKE 'k2.%'")[0]["n"] == 20

    out = run_cli("rekey", "--batch-size", "10", env={**env, "PIPELINE_PIPELINE__PROGRESS_INTERVAL": "0.001"})
    assert out.returncode == 0, out.stderr[-2000:]
    second = orjson.loads(out.stdout)  # resumed: only what was left
    progress = [orjson.loads(line) for line in out.stderr.splitlines() if '"rekey progress"' in line]
    assert progress and progress[-1]["rows_updated"] == 37 and progress[-1]["batches"] == 5  # 35 by message id, 2 by ctid
    assert second["rows_pending_at_start"] == 37 and second["rows_updated"] == 37 and second["complete"]
    assert second["values_rekeyed"] == {"k1": {"masked_ip": 37, "masked_device_id": 37}}

    third = cli_json("rekey", env=env)
    assert third["rows_updated"] == 0 and third["rows_pending_at_start"] == 0 and third["complete"]

    rows = fetch(pg_dsn, "SELECT * FROM user_logins")
    k2 = Masker([K2])
    for r in rows:
        if r["user_id"].startswith("u"):
            i = int(r["user_id"][1:])
            assert r["masked_ip"] == k2.mask(IPS[i % len(IPS)]) and r["masked_device_id"] == k2.mask(DEVICES[i % len(DEVICES)])
        elif r["user_id"].startswith("hand"):
            assert k2.unmask(r["masked_device_id"]).startswith("dev-")
    assert fetch(pg_dsn, "SELECT * FROM user_logins WHERE user_id LIKE 'old%' ORDER BY user_id") == legacy_before


def test_rekey_refuses_a_key_id_missing_from_the_ring(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(_seed(pg_dsn, 5))
    before = fetch(pg_dsn, "SELECT * FROM user_logins ORDER BY user_id")
    error = one_error(run_cli("rekey", env=pipeline_env(queues, pg_dsn, K2.encode())))
    assert "key id 'k1'" in error and "not in the key ring" in error and "Nothing was changed" in error
    assert secret_of(K2) not in error
    assert fetch(pg_dsn, "SELECT * FROM user_logins ORDER BY user_id") == before


def secret_of(key) -> str:  # type: ignore[no-untyped-def]
    return key.encode().split(":", 1)[1]


def test_unmask_stdin_and_audit_line(queues, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    audit_file = tmp_path / "audit.jsonl"
    env = rotated_env(queues, pg_dsn, PIPELINE_MASKING__AUDIT_LOG=str(audit_file))
    raw = ["203.0.113.7", "812-55-1234", "2001:db8::7"]
    tokens = [Masker([K1]).mask(raw[0]), Masker([K2]).mask(raw[1]), Masker([K2]).mask(raw[2])]

    out = run_cli("unmask", "-", env=env, input="\n".join(tokens) + "\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == raw
    (line,) = audit_lines(out.stderr)
    assert line["mode"] == "stdin" and line["count"] == 3 and line["key_ids"] == {"k1": 1, "k2": 2}
    assert line["outcome"] == "ok" and line["user"] and line["at"].endswith("Z")
    (stored,) = [orjson.loads(x) for x in audit_file.read_text().splitlines()]
    assert stored["count"] == 3 and stored["key_ids"] == line["key_ids"]

    # Refused: a key id the ring does not hold, named; audited too; nothing printed.
    k9 = generate_key("k9")
    out = run_cli("unmask", tokens[1], Masker([k9]).mask("198.51.100.1"), env=env)
    assert "'k9'" in one_error(out) and out.stdout == ""
    (refused,) = audit_lines(out.stderr)
    assert refused["outcome"] == "refused" and refused["missing_key_id"] == "k9" and refused["mode"] == "args"
    assert refused["key_ids"] == {"k2": 1, "k9": 1} and refused["count"] == 2
    assert refused["reason"].startswith("no key with id 'k9' in the key ring") and "error" not in refused

    everything = out.stderr + audit_file.read_text()
    for secret in [*raw, "198.51.100.1", *tokens, *(t.split(".", 1)[1] for t in tokens), secret_of(K1), secret_of(K2)]:
        assert secret not in everything
    assert len(audit_file.read_text().splitlines()) == 2


def test_kms_wrapped_key(localstack, queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """A data key wrapped under a LocalStack KMS key: keygen wraps it, run unwraps it at start."""
    kms = boto3.client("kms", endpoint_url=localstack.endpoint, region_name="us-east-1")
    arn = kms.create_key(Description="pipeline masking test")["KeyMetadata"]["Arn"]
    base = pipeline_env(queues, pg_dsn, "")

    out = run_cli("keygen", "--kms-key-id", arn, "--key-id", "kw", env=base)
    assert out.returncode == 0, out.stderr[-2000:]
    wrapped = out.stdout.strip()
    assert wrapped.startswith("kw:kms:") and len(wrapped.splitlines()) == 1

    env = {**base, "PIPELINE_MASKING__KMS_WRAPPED_KEYS": wrapped, "PIPELINE_MASKING__KMS_KEY_ID": arn}
    evs = events(12, seed=3)
    send(queues, evs)
    assert run_pipeline(env)["inserted"] == 12
    rows = fetch(pg_dsn, "SELECT user_id, masked_ip, masked_device_id FROM user_logins ORDER BY user_id")
    assert all(r["masked_ip"].startswith("kw.") for r in rows)
    out = run_cli("unmask", rows[0]["masked_ip"], rows[0]["masked_device_id"], env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    e = {x["user_id"]: x for x in evs}[rows[0]["user_id"]]
    assert out.stdout.split() == [e["ip"], e["device_id"]]

    # An existing plain key can be wrapped too (--wrap-stdin), and unwraps to the same key.
    out = run_cli("keygen", "--kms-key-id", arn, "--wrap-stdin", env=base, input=K1.encode() + "\n")
    assert out.returncode == 0 and out.stdout.startswith("k1:kms:") and secret_of(K1) not in out.stdout
    settings = Settings(sqs={"endpoint_url": localstack.endpoint}, masking={"kms_wrapped_keys": out.stdout.strip()})
    m = asyncio.run(load_masker(settings))
    assert m.unmask(Masker([K1]).mask("1.2.3.4")) == "1.2.3.4"

    # The blob is bound to its key id: renamed, KMS refuses it; the error names id and source.
    renamed = "kx" + wrapped[2:]
    error = one_error(run_cli("run", "--until-empty", env={**env, "PIPELINE_MASKING__KMS_WRAPPED_KEYS": renamed}))
    assert "'kx'" in error and "masking.kms_wrapped_keys" in error and "InvalidCiphertext" in error
    assert wrapped.split(":", 2)[2][:16] not in error
    # An unreachable KMS is one line too.
    error = one_error(run_cli("unmask", rows[0]["masked_ip"],
                              env={**env, "PIPELINE_MASKING__KMS_ENDPOINT_URL": "http://127.0.0.1:9"}))
    assert "KMS endpoint http://127.0.0.1:9 is unreachable" in error and "'kw'" in error
