"""Configuration: TOML overlaid by env, unknown keys and bad values are one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.settings import ConfigError, load_settings, redact_dsn

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_is_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in __import__("os").environ if v.startswith("PIPELINE_")]:
        monkeypatch.delenv(var)
    s = load_settings(ROOT / "config.toml")
    assert s.embedded_sqs and s.embedded_postgres
    assert s.sqs.receivers >= 1 and s.pipeline.batch_size >= 1


@pytest.mark.parametrize(
    ("var", "value"),
    [("PIPELINE_SQS__ENDPOINT_URL", "http://x:4566"), ("PIPELINE_SQS__QUEUE_URL", "http://x/1/q"),
     ("PIPELINE_SQS__DLQ_URL", "https://x/1/q-dlq"), ("PIPELINE_SQS__REGION", "eu-central-2")],
)
def test_env_overrides(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    s = load_settings(ROOT / "config.toml")
    assert getattr(s.sqs, var.split("__")[1].lower()) == value


@pytest.mark.parametrize(
    ("var", "value"),
    [("PIPELINE_SQS__REGION", "not a region!"), ("PIPELINE_SQS__REGION", ""), ("PIPELINE_SQS__REGION", "US-EAST-1"),
     ("PIPELINE_SQS__ENDPOINT_URL", "localhost:4566"), ("PIPELINE_SQS__ENDPOINT_URL", "ht!tp://x"),
     ("PIPELINE_SQS__ENDPOINT_URL", "http://"), ("PIPELINE_SQS__ENDPOINT_URL", "http://h:port"),
     ("PIPELINE_SQS__QUEUE_URL", "login-queue"), ("PIPELINE_MASKING__KMS_ENDPOINT_URL", "ftp://kms"),
     ("PIPELINE_POSTGRES__DSN", "host=h password=pw"), ("PIPELINE_POSTGRES__DSN", "mysql://u:pw@h/db"),
     ("PIPELINE_POSTGRES__DSN", "postgresql://u:pw@h:port/db")],
)
def test_malformed_endpoints_regions_and_dsns_are_config_errors(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    """Caught here, as one line, instead of as a traceback from deep inside botocore or asyncpg."""
    monkeypatch.setenv(var, value)
    where = var.removeprefix("PIPELINE_").lower().replace("__", ".")
    with pytest.raises(ConfigError, match=re.escape(where)) as err:
        load_settings(ROOT / "config.toml")
    assert "\n" not in str(err.value) and "Value error" not in str(err.value)
    assert "pw" not in str(err.value).replace("password", "")


def test_a_dsn_password_with_a_slash_is_a_config_error_that_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncpg reads 'u:ab' as host u, port 'ab': the password must be percent-encoded.
    monkeypatch.setenv("PIPELINE_POSTGRES__DSN", "postgresql://u:ab/Secretpw@h:5432/db")
    with pytest.raises(ConfigError, match="percent-encode") as err:
        load_settings(ROOT / "config.toml")
    assert "Secretpw" not in str(err.value) and "'ab'" not in str(err.value)


def test_secret_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_POSTGRES__DSN", "postgresql://u:pw@h/db")
    monkeypatch.setenv("PIPELINE_MASKING__KEY", "k1:abc")
    s = load_settings(ROOT / "config.toml")
    assert s.postgres.dsn.get_secret_value() == "postgresql://u:pw@h/db"
    assert "pw" not in repr(s) and "abc" not in repr(s)


def test_unknown_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_SQS__QUEUEURL", "x")
    with pytest.raises(ConfigError, match="PIPELINE_SQS__QUEUEURL"):
        load_settings(ROOT / "config.toml")


def test_unknown_file_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[sqs]\nreceiverz = 3\n')
    with pytest.raises(ConfigError, match="sqs.receiverz"):
        load_settings(cfg)


def test_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_SQS__WAIT_TIME_SECONDS", "99")
    with pytest.raises(ConfigError, match="sqs.wait_time_seconds"):
        load_settings(ROOT / "config.toml")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(Path("/nonexistent.toml"))


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://postgres:s3cret@db:5432/x") == "postgresql://postgres:***@db:5432/x"
    assert redact_dsn("postgresql://postgres:@/postgres?host=/tmp") == "postgresql://postgres:***@/postgres?host=/tmp"
    assert redact_dsn("postgresql://db/x") == "postgresql://db/x"
