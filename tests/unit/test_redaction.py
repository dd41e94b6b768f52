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


@pytest.mark.parametrize(("dsn", "targets", "misread"), [
    ("postgresql://u:hunter2@db:5433/x", ["db:5433"], False),
    ("postgresql://u:hunter2@a:1,b:2/x", ["a:1", "b:2"], False),
    ("postgresql://u:p@ss/w@db:5432/x", ["***:5432"], True),  # the driver's host is a piece of the password
    ("postgresql://u:pa@ss@127.0.0.1:1/x", ["***@127.0.0.1:1"], True),
    ("postgresql://u:p%40ss@db:5432/x", ["db:5432"], False),  # percent-encoded: read as meant
])
def test_dsn_targets_are_what_the_driver_tries_without_password_pieces(dsn: str, targets: list[str], misread: bool) -> None:
    from pipeline.settings import dsn_hint, dsn_targets

    assert dsn_targets(dsn) == targets
    assert bool(dsn_hint(dsn)) is misread
    assert "percent-encoding" in dsn_hint(dsn) or not misread
