"""``migrate``, ``retention`` and ``erase`` through the CLI, as an operator runs them: JSON reports,
audit records without raw PII, and one ``error:`` line for what an operator can get wrong."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import orjson

from stages.masking import generate_key
from tests.helpers import TAKEHOME_DDL, fetch, pipeline_env, run_cli

KEY = generate_key("tbl").encode()


def _months_ago(n: int) -> dt.date:
    today = dt.datetime.now(dt.UTC).date()
    y, m = divmod(today.year * 12 + today.month - 1 - n, 12)
    return dt.date(y, m + 1, 10)


def _error_line(p) -> str:  # type: ignore[no-untyped-def]
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def test_retention_and_erase_on_a_fresh_partitioned_table_are_reported_and_audited(queues, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    audit = tmp_path / "audit.jsonl"
    env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_MASKING__AUDIT_LOG=str(audit))
    migrated = run_cli("migrate", env=env, timeout=60)
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    assert fetch(pg_dsn, "SELECT relkind::text FROM pg_class WHERE relname = 'user_logins'")[0][0] == "p"
    today, three, thirteen = dt.datetime.now(dt.UTC).date(), _months_ago(3), _months_ago(13)
    fetch(pg_dsn, "INSERT INTO user_logins (user_id, create_date, message_id) SELECT u, d, md5(u || d || i) "
                  "FROM unnest($1::text[], $2::date[]) AS t(u, d), generate_series(1, 3) i",
          ["old", "recent", "alice", "alice", "bob"], [thirteen, three, today, three, today])

    retention = run_cli("retention", "--keep-days", "180", env=env, timeout=60)
    assert retention.returncode == 0, retention.stderr[-2000:]
    report = orjson.loads(retention.stdout.splitlines()[-1])
    assert report["rows_deleted"] == {"user_logins_default": 3}, report  # a fresh table's older rows sit in DEFAULT
    left = sorted((r[0], r[1]) for r in fetch(pg_dsn, "SELECT DISTINCT user_id, create_date FROM user_logins"))
    assert left == sorted([("recent", three), ("alice", today), ("alice", three), ("bob", today)])
    assert run_cli("retention", "--keep-days", "180", env=env, timeout=60).stdout.count('"rows_deleted_total":0') == 1

    erased = run_cli("erase", "--user-id", "alice", env=env, timeout=60)
    assert erased.returncode == 0, erased.stderr[-2000:]
    report = orjson.loads(erased.stdout.splitlines()[-1])
    assert report["rows_deleted"] == 6 and len(report["by_partition"]) == 2, report  # two months
    assert sorted({r[0] for r in fetch(pg_dsn, "SELECT user_id FROM user_logins")}) == ["bob", "recent"]

    records = [orjson.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["audit"], r.get("phase")) for r in records] == [
        ("retention", None), ("retention", None), ("erase", "start"), ("erase", "done")]
    assert records[0]["keep_days"] == 180 and records[3]["rows_deleted"] == 6 and records[3]["users"] == 1
    assert records[3]["user_id_sha256"] == [hashlib.sha256(b"alice").hexdigest()]
    for text in (audit.read_text(), erased.stdout, erased.stderr):
        assert '"alice"' not in text and "alice" not in text.replace(hashlib.sha256(b"alice").hexdigest(), "")


def test_operator_mistakes_are_one_error_line(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, KEY)
    assert "--keep-days" in _error_line(run_cli("retention", env=env, timeout=60))
    assert "does not exist" in _error_line(run_cli("retention", "--keep-days", "5", env=env, timeout=60))
    assert "does not exist" in _error_line(run_cli("erase", "--user-id", "x", env=env, timeout=60))
    assert "does not exist" in _error_line(run_cli("migrate", "--partition", env=env, timeout=60))
    fetch(pg_dsn, TAKEHOME_DDL)
    fetch(pg_dsn, "ALTER TABLE user_logins ADD COLUMN note text")
    assert "columns the pipeline does not know (note)" in _error_line(run_cli("migrate", "--partition", env=env, timeout=60))
    unwritable = pipeline_env(queues, pg_dsn, KEY, PIPELINE_MASKING__AUDIT_LOG="/nonexistent/dir/audit.jsonl")
    line = _error_line(run_cli("erase", "--user-id", "x", env=unwritable, timeout=60))
    assert "audit log" in line and "nothing erased" in line


def test_migrate_partition_converts_a_takehome_table_from_the_cli(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, KEY)
    fetch(pg_dsn, TAKEHOME_DDL)
    fetch(pg_dsn, "INSERT INTO user_logins SELECT 'u' || i, 'ios', 'a', 'b', NULL, 2, current_date - i "
                  "FROM generate_series(1, 300) i")
    first = run_cli("migrate", "--partition", "--batch-blocks", "1", "--max-batches", "1", env=env, timeout=60)
    assert first.returncode == 0 and orjson.loads(first.stdout)["status"] == "interrupted", first.stderr[-2000:]
    done = run_cli("migrate", "--partition", "--batch-blocks", "1", env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = orjson.loads(done.stdout)
    assert summary["status"] == "converted" and summary["resumed"] and summary["rows"] == 300, summary
    assert '"conversion progress"' in done.stderr  # a progress line per batch
    assert fetch(pg_dsn, "SELECT relkind::text FROM pg_class WHERE relname = 'user_logins'")[0][0] == "p"
    assert fetch(pg_dsn, "SELECT count(*), min(app_version) FROM user_logins")[0][:] == (300, "2")
