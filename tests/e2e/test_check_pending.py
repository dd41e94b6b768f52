"""``check`` and ``migrate`` agree: what check reports as pending is exactly what migrate then applies.

Both derive from ``schema.plan``; these tests hold them to it through the CLI, on a fresh database and
on the takehome's pre-created table, and check that a table the role could not create is a failure.
"""

from __future__ import annotations

import re
import uuid

import orjson
import pytest

from stages.masking import generate_key
from tests.helpers import TAKEHOME_DDL, fetch, pipeline_env, run_cli

KEY = generate_key("pend").encode()
PENDING = re.compile(r"^ok   table public\.user_logins .*?(\d+) change\(s\) pending", re.MULTILINE)


@pytest.mark.parametrize("start", ["fresh", "takehome"])
def test_check_pending_count_is_what_migrate_applies(queues, pg_dsn: str, start: str) -> None:  # type: ignore[no-untyped-def]
    if start == "takehome":
        fetch(pg_dsn, TAKEHOME_DDL)
    env = pipeline_env(queues, pg_dsn, KEY)
    check = run_cli("check", env=env, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr[-2000:]
    found = PENDING.search(check.stdout)
    assert found, check.stdout
    migrate = run_cli("migrate", env=env, timeout=60)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    changes = orjson.loads(migrate.stdout.strip().splitlines()[-1])["changes"]
    assert int(found.group(1)) == len(changes) == (8 if start == "fresh" else 5), (check.stdout, changes)
    again = run_cli("check", env=env, timeout=60)
    assert "ok   table public.user_logins present and up to date" in again.stdout, again.stdout


def test_a_missing_table_the_role_cannot_create_fails(queues, postgres, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    role = f"nocreate_{uuid.uuid4().hex[:8]}"  # PostgreSQL 15+: PUBLIC may not create in schema public
    postgres.psql(f"CREATE ROLE {role} LOGIN")
    try:
        dsn = pg_dsn.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
        env = pipeline_env(queues, dsn, KEY)
        check = run_cli("check", env=env, timeout=60)
        assert check.returncode == 1, check.stdout
        failed = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
        assert failed == ["FAIL table public.user_logins does not exist and `run` could not create it: "
                          "the user may not create tables in schema public"], check.stdout
        migrate = run_cli("migrate", env=env, timeout=60)
        errors = [line for line in migrate.stderr.splitlines() if line.startswith("error:")]
        assert migrate.returncode == 1 and len(errors) == 1 and "Traceback" not in migrate.stderr, migrate.stderr
        assert "permission denied" in errors[0], errors[0]
    finally:
        postgres.psql(f"DROP ROLE IF EXISTS {role}")
