"""DSN passwords never reach a log line or an error, however the DSN spells (or misspells) them."""

from __future__ import annotations

import pytest

from pipeline.settings import redact_dsn, scrub_dsn_secrets

SECRET = "hunter2"


@pytest.mark.parametrize(("dsn", "redacted"), [
    ("postgresql://u:hunter2@db:5432/x", "postgresql://u:***@db:5432/x"),
    ("postgresql://:hunter2@db/x", "postgresql://:***@db/x"),
    ("postgresql://u:p@ss:hunter2@db/x", "postgresql://u:***@db/x"),  # unescaped '@' in the password
    ("postgresql://u:pa/hunter2@db/x", "postgresql://u:***@db/x"),  # unescaped '/'
    ("postgresql://u@db/x?password=hunter2&sslmode=require", "postgresql://u@db/x?password=***&sslmode=require"),
    ("host=db password=hunter2 port=5432", "host=db password=*** port=5432"),
    ("host=db password='hun ter2' port=5432", "host=db password=*** port=5432"),
    ("hunter2", "<unparseable dsn>"),
    ("postgresql://postgres@/x?host=/tmp/s&port=5432", "postgresql://postgres@/x?host=/tmp/s&port=5432"),
])
def test_redact_dsn(dsn: str, redacted: str) -> None:
    assert redact_dsn(dsn) == redacted


@pytest.mark.parametrize("dsn", [
    "postgresql://u:hunter2@db/x", "postgresql://u:p@ss:hunter2@db/x", "postgresql://u:hunter2/pa@db/x",
    "postgresql://u@db/x?password=hunter2", "host=db password=hunter2",
])
def test_scrub_removes_the_password_and_its_pieces(dsn: str) -> None:
    text = "invalid literal for int() with base 10: 'hunter2@db:5432' (hunter2)"
    assert SECRET not in scrub_dsn_secrets(text, dsn)
