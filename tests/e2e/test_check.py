"""``python -m pipeline check`` against LocalStack and PostgreSQL: one line per finding."""

from __future__ import annotations

from stages.masking import generate_key
from tests.helpers import TAKEHOME_DDL, fetch, pipeline_env, run_cli

KEY = generate_key("chk").encode()


def findings(stdout: str) -> list[str]:
    lines = stdout.strip().splitlines()
    assert lines and all(line.startswith(("ok   ", "FAIL ")) for line in lines), stdout
    return lines


def test_check_all_ok_on_the_takehome_table(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    fetch(pg_dsn, TAKEHOME_DDL)
    queues.client.send_message(QueueUrl=queues.queue_url, MessageBody="{}")
    out = run_cli("check", env=pipeline_env(queues, pg_dsn, KEY), timeout=60)
    lines = findings(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert not [line for line in lines if line.startswith("FAIL")]
    text = out.stdout
    assert f"sqs queue {queues.queue_url} (visible=1, in_flight=0" in text
    assert f"sqs dlq {queues.dlq_url}" in text
    assert "masking key id 'chk' writes" in text
    assert "table public.user_logins present and compatible" in text and "app_version" in text  # pending, in place
    # Read-only: the takehome table is still unmigrated, the message still there.
    cols = {r["column_name"] for r in fetch(pg_dsn, "SELECT column_name FROM information_schema.columns "
                                                    "WHERE table_name = 'user_logins'")}
    assert "message_id" not in cols
    assert KEY.split(":", 1)[1] not in text + out.stderr


def test_check_fails_with_one_line_for_a_missing_queue(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    assert run_cli("migrate", env=pipeline_env(queues, pg_dsn, KEY), timeout=60).returncode == 0
    missing = queues.queue_url + "-nope"
    env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_SQS__QUEUE_URL=missing)
    out = run_cli("check", env=env, timeout=60)
    lines = findings(out.stdout)
    assert out.returncode == 1
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1 and missing in failed[0] and "does not exist" in failed[0], lines
    assert any(line.startswith("ok   table public.user_logins present and up to date") for line in lines)


def test_check_reports_an_unreachable_database_and_a_missing_table(queues, postgres, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    out = run_cli("check", env=pipeline_env(queues, pg_dsn, KEY), timeout=60)
    assert out.returncode == 0, out.stdout  # `run` creates the table: pending, not a failure
    assert "ok   table public.user_logins not created yet; `run` or `migrate` creates it; 8 change(s) pending" in out.stdout

    dsn = "postgresql://nobody:secret-pw@127.0.0.1:1/postgres"
    out = run_cli("check", env=pipeline_env(queues, dsn, KEY), timeout=60)
    failed = [line for line in findings(out.stdout) if line.startswith("FAIL")]
    assert out.returncode == 1 and len(failed) == 1 and failed[0].startswith("FAIL postgres at postgresql://nobody:***@")
    assert "secret-pw" not in out.stdout + out.stderr
