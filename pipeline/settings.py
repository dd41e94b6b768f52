"""Typed configuration: ``config.toml`` overlaid by ``PIPELINE_<SECTION>__<KEY>`` env vars.

Loaded once, at start-up, into one immutable ``Settings`` object. Unknown keys are
errors, not silently ignored: a typo in a config key must not become a default.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from stages.sqs import derived_dlq_url

from .dsn import dsn_hint, dsn_problem, dsn_targets, redact_dsn, scrub_dsn_secrets  # noqa: F401 - re-exported

__all__ = ["Settings", "ConfigError", "load_settings", "redact_dsn", "scrub_dsn_secrets", "dsn_targets", "dsn_hint",
           "http_url"]

ENV_PREFIX = "PIPELINE_"


class ConfigError(Exception):
    """Configuration is unusable; the message is one line meant for the operator."""


# Every AWS partition's region names: us-east-1, eu-central-2, us-gov-west-1, cn-north-1, ...
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")


def http_url(v: str) -> str:
    """Empty, or an http(s) URL with a host; botocore would otherwise fail with a traceback."""
    if not v:
        return v
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(f"{v!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{v!r} is not an http(s) URL with a host (like http://localhost:4566)")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SqsSettings(_Section):
    endpoint_url: str = ""
    queue_url: str = ""
    dlq_url: str = ""
    region: str = "us-east-1"
    receivers: int = Field(8, ge=1, le=256)
    wait_time_seconds: int = Field(10, ge=0, le=20)
    visibility_timeout: int = Field(30, ge=0, le=43200)
    max_in_flight: int = Field(5000, ge=10)
    max_receive_count: int = Field(5, ge=1)
    ackers: int = Field(4, ge=1, le=64)
    create_dlq: bool = True

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        # botocore builds the endpoint host from the region; a malformed one fails deep inside
        # client creation (``Invalid endpoint: https://sqs..amazonaws.com``) instead of here.
        if not _REGION.fullmatch(v):
            raise ValueError(f"{v!r} is not an AWS region (like us-east-1 or eu-central-2)")
        return v

    @field_validator("endpoint_url", "queue_url", "dlq_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return http_url(v)

    @model_validator(mode="before")
    @classmethod
    def _default_dlq(cls, data: Any) -> Any:
        """No DLQ configured: use ``<queue_url>-dlq`` (created if missing), never drop rejects."""
        if isinstance(data, dict) and data.get("queue_url") and not data.get("dlq_url"):
            data = {**data, "dlq_url": derived_dlq_url(str(data["queue_url"]))}
        return data

    @model_validator(mode="after")
    def _dlq_is_not_the_source(self) -> SqsSettings:
        """Rejects sent back to the queue they came from would loop forever."""
        if self.queue_url and self.dlq_url.rstrip("/") == self.queue_url.rstrip("/"):
            raise ValueError("sqs.dlq_url is the source queue itself: rejected messages would come straight back")
        return self


class PostgresSettings(_Section):
    dsn: SecretStr = SecretStr("")
    table: str = "user_logins"
    pool_size: int = Field(4, ge=2, le=64)
    recovery_dsn: SecretStr = Field(SecretStr(""), description=(
        "DSN `unmask --query/--where` reads with instead of `dsn`: a role granted only SELECT on the table, "
        "so a recovery can read and nothing else; empty = `dsn`"))

    @field_validator("dsn", "recovery_dsn")
    @classmethod
    def _dsn(cls, v: SecretStr) -> SecretStr:
        dsn = v.get_secret_value()
        if dsn:
            problem = dsn_problem(dsn)
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("table")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", v):
            raise ValueError("must be a plain SQL identifier")
        return v


class MaskingSettings(_Section):
    """The key ring (see ``pipeline.keyring``): plain or KMS-wrapped keys from env or a file."""

    key: SecretStr = SecretStr("")
    keys: SecretStr = SecretStr("")
    key_file: str = ""
    active_key_id: str = ""
    kms_key_id: str = ""
    kms_wrapped_keys: str = ""
    kms_endpoint_url: str = ""
    audit_log: str = ""

    @field_validator("kms_endpoint_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return http_url(v)

    @property
    def configured(self) -> bool:
        """Whether any key source is set (else the embedded default generates a local key)."""
        return bool(self.key.get_secret_value().strip() or self.keys.get_secret_value().strip()
                    or self.key_file or self.kms_wrapped_keys.strip())


class PipelineSettings(_Section):
    batch_size: int = Field(2000, ge=1, le=100_000)
    batch_timeout: float = Field(0.1, gt=0, le=60)
    queue_size: int = Field(64, ge=1)
    grace_seconds: float = Field(10, ge=0)
    state_dir: Path = Path(".pipeline")
    sample_size: int = Field(100, ge=0)
    progress_interval: float = Field(10, gt=0)
    processes: int = Field(1, ge=1, le=64)  # worker processes on the same queue (multi-core hosts)


class HttpSettings(_Section):
    port: int | None = Field(None, ge=1, le=65535)
    host: str = "0.0.0.0"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    sqs: SqsSettings = SqsSettings()
    postgres: PostgresSettings = PostgresSettings()
    masking: MaskingSettings = MaskingSettings()
    pipeline: PipelineSettings = PipelineSettings()
    http: HttpSettings = HttpSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file: the file's values arrive as init kwargs.
        return (env_settings, init_settings)

    @property
    def embedded_sqs(self) -> bool:
        return not self.sqs.queue_url

    @property
    def embedded_postgres(self) -> bool:
        return not self.postgres.dsn.get_secret_value()

    @property
    def embedded(self) -> bool:
        return self.embedded_sqs or self.embedded_postgres


def _unknown_env_keys() -> list[str]:
    sections = {name.upper(): model for name, model in Settings.model_fields.items()}
    bad = []
    for var in os.environ:
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        section, sep, key = var[len(ENV_PREFIX):].partition("__")
        if not sep:  # e.g. Kubernetes service links (PIPELINE_SERVICE_HOST): not ours
            continue
        field = sections.get(section)
        if field is None or key.lower() not in field.annotation.model_fields:  # type: ignore[union-attr]
            bad.append(var)
    return bad


def default_config_path() -> Path | None:
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    if env:
        return Path(env)
    here = Path("config.toml")
    return here if here.is_file() else None


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), apply env overrides, validate; raise ``ConfigError``."""
    path = path if path is not None else default_config_path()
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    bad = _unknown_env_keys()
    if bad:
        raise ConfigError(f"unknown configuration variable {bad[0]} (expected PIPELINE_<SECTION>__<KEY>, e.g. PIPELINE_SQS__QUEUE_URL)")
    try:
        return Settings(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        source = f"PIPELINE_{where.replace('.', '__').upper()}" if len(err["loc"]) == 2 else where
        if err["type"] == "extra_forbidden":
            msg = f"unknown configuration key {where!r} (in {path or 'config'} or {source})"
        else:
            msg = f"invalid value for {where} ({source}): {err['msg'].removeprefix('Value error, ')}"
        more = len(exc.errors()) - 1
        raise ConfigError(msg + (f" (and {more} more)" if more else "")) from None
