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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["Settings", "ConfigError", "load_settings", "redact_dsn", "scrub_dsn_secrets"]

ENV_PREFIX = "PIPELINE_"


class ConfigError(Exception):
    """Configuration is unusable; the message is one line meant for the operator."""


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

    @model_validator(mode="before")
    @classmethod
    def _default_dlq(cls, data: Any) -> Any:
        """No DLQ configured: use ``<queue_url>-dlq`` (created if missing), never drop rejects."""
        if isinstance(data, dict) and data.get("queue_url") and not data.get("dlq_url"):
            data = {**data, "dlq_url": str(data["queue_url"]).rstrip("/") + "-dlq"}
        return data


class PostgresSettings(_Section):
    dsn: SecretStr = SecretStr("")
    table: str = "user_logins"
    pool_size: int = Field(4, ge=2, le=64)
    recovery_dsn: SecretStr = Field(SecretStr(""), description=(
        "DSN `unmask --query/--where` reads with instead of `dsn`: a role granted only SELECT on the table, "
        "so a recovery can read and nothing else; empty = `dsn`"))

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


# ``password=`` in a URI query or a libpq ``key=value`` DSN, quoted or not.
_PASSWORD_PARAM = re.compile(r"((?:^|[?&\s])password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)", re.IGNORECASE)


def _userinfo(dsn: str) -> tuple[str, str, str] | None:
    """(scheme://user, password, @rest) of a URI DSN with a password, split at the *last* ``@``.

    The last, not the first: a password with an unescaped ``@`` or ``/`` must still be found
    (libraries that split at the first ``@`` would read part of it as the host).
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return None
    userinfo, at, host = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not (at and colon):
        return None
    return f"{scheme}://{user}", password, f"@{host}"


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced, for logs and errors, however the password is given."""
    parts = _userinfo(dsn)
    if parts is not None:
        dsn = f"{parts[0]}:***{parts[2]}"
    elif "://" not in dsn and "=" not in dsn:
        return "<unparseable dsn>"  # not a URI nor key=value: it could be anything, a password included
    return _PASSWORD_PARAM.sub(r"\1***", dsn)


def scrub_dsn_secrets(text: str, dsn: str) -> str:
    """``text`` (e.g. a driver's error message) without the DSN's password or recognisable pieces of it."""
    secrets = [m.group(2).strip("'") for m in _PASSWORD_PARAM.finditer(dsn)]
    parts = _userinfo(dsn)
    if parts is not None:
        secrets.append(parts[1])
    pieces = {p for s in secrets if s for p in [s, *re.split(r"[@:/?#&]", s)] if len(p) >= 3}
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "***")
    return text


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
            msg = f"invalid value for {where} ({source}): {err['msg']}"
        more = len(exc.errors()) - 1
        raise ConfigError(msg + (f" (and {more} more)" if more else "")) from None
