"""Typed configuration: ``config.toml`` overlaid by ``PIPELINE_<SECTION>__<KEY>`` env vars.

Loaded once, at start-up, into one immutable ``Settings`` object. Unknown keys are
errors, not silently ignored: a typo in a config key must not become a default.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
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


# 63-byte identifiers less the longest suffix a derived name adds (``_create_date_message_id_key``).
TABLE_NAME_MAX = 63 - len("_create_date_message_id_key")
# Every AWS partition's region names: us-east-1, eu-central-2, us-gov-west-1, cn-north-1, ...
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")


def _word_or_number(v: Any, word: str, low: int, high: int) -> int | str:
    """``word``, or a whole number from ``low`` to ``high``, as TOML or an environment variable spells it."""
    text = str(v).strip().lower()
    if text == word:
        return text
    if isinstance(v, bool) or not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{v!r} is neither `{word}` nor a number from {low} to {high}")
    return int(text)


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
    endpoint_url: str = Field("", description="SQS endpoint (e.g. `http://localhost:4566`); empty = AWS")
    queue_url: str = Field("", description="source queue; empty = embedded broker")
    dlq_url: str = Field("", description=(
        "dead-letter queue, of the source's type and never the source itself; empty = `<queue_url>-dlq` "
        "(`<name>-dlq.fifo` for a FIFO source)"))
    region: str = Field("us-east-1", description="AWS region")
    receive_concurrency: int | Literal["adaptive"] = Field("adaptive", description=(
        "concurrent `ReceiveMessage` calls: `adaptive` (grows while it adds throughput, shrinks on throttling, "
        "errors and a full pipeline, between `min_receivers` and `max_receivers`) or a number to pin it"))
    receivers: int = Field(8, ge=1, le=512, description="receive concurrency to start from (adaptive)")
    min_receivers: int = Field(1, ge=1, le=512, description="lowest adaptive receive concurrency")
    max_receivers: int = Field(128, ge=1, le=512, description="highest adaptive receive concurrency")
    wait_time_seconds: int = Field(10, ge=0, le=20, description="long-poll wait, 0–20")
    visibility_timeout: int = Field(30, ge=0, le=43200, description=(
        "visibility timeout requested on receive (0 = the queue's); held messages are extended before it runs out"))
    max_in_flight: int = Field(5000, ge=10, description="cap on received-but-not-acked messages")
    envelope: Literal["auto", "none", "sns", "eventbridge"] = Field("auto", description=(
        "what wraps each body: `auto` unwraps an SNS notification (its `Message`) and an EventBridge event (its "
        "`detail`) and takes anything else as it is; `none` never unwraps; `sns` / `eventbridge` require that "
        "envelope and dead-letter other bodies (a redriven event dead letter is accepted bare)"))
    max_receive_count: int = Field(5, ge=1, description="a message received more often goes to the DLQ as poison")
    delete_concurrency: int | Literal["adaptive"] = Field("adaptive", description=(
        "concurrent `DeleteMessageBatch` calls of committed messages (dead letters have lanes of their own): "
        "`adaptive` (between `min_ackers` and `max_ackers`) or a number to pin it"))
    ackers: int = Field(16, ge=1, le=512, description="delete concurrency to start from (adaptive)")
    min_ackers: int = Field(1, ge=1, le=512, description="lowest adaptive delete concurrency")
    max_ackers: int = Field(128, ge=1, le=512, description="highest adaptive delete concurrency")
    create_dlq: bool = Field(True, description=(
        "create the DLQ if it does not exist (set `false` where IAM forbids `CreateQueue`)"))

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

    @field_validator("receive_concurrency", "delete_concurrency", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> int | str:
        return _word_or_number(v, "adaptive", 1, 512)

    @model_validator(mode="after")
    def _concurrency_bounds(self) -> SqsSettings:
        for what, low, high in (("receivers", self.min_receivers, self.max_receivers),
                                ("ackers", self.min_ackers, self.max_ackers)):
            if low > high:
                raise ValueError(f"sqs.min_{what} ({low}) is above sqs.max_{what} ({high})")
        return self

    def concurrency(self, op: str) -> tuple[int, int, int, int | None]:
        """``(start, minimum, maximum, pinned)`` of ``receive`` or ``delete`` calls; the start lies within the bounds."""
        if op == "receive":
            setting, start, low, high = self.receive_concurrency, self.receivers, self.min_receivers, self.max_receivers
        else:
            setting, start, low, high = self.delete_concurrency, self.ackers, self.min_ackers, self.max_ackers
        pinned = setting if isinstance(setting, int) else None
        return min(max(start, low), high), low, high, pinned

    def max_concurrency(self) -> int:
        """The most SQS calls of the data path ever under way at once (connection pool sizing)."""
        return sum(p if p is not None else high for _, _, high, p in (self.concurrency("receive"), self.concurrency("delete")))

    @model_validator(mode="after")
    def _dlq_is_not_the_source(self) -> SqsSettings:
        """Rejects sent back to the queue they came from would loop forever."""
        if self.queue_url and self.dlq_url.rstrip("/") == self.queue_url.rstrip("/"):
            raise ValueError("sqs.dlq_url is the source queue itself: rejected messages would come straight back")
        return self


class PostgresSettings(_Section):
    dsn: SecretStr = Field(SecretStr(""), description=(
        "libpq URI; empty = embedded PostgreSQL. Passwords are redacted wherever printed"))
    table: str = Field("user_logins", description=(
        f"target table: a plain SQL identifier of at most {TABLE_NAME_MAX} characters, so that the names derived "
        "from it (monthly partitions, indexes) fit PostgreSQL's 63-byte identifiers"))
    pool_size: int = Field(4, ge=2, le=64, description="asyncpg pool size")
    write_method: Literal["auto", "upsert"] = Field("auto", description=(
        "how a batch is written: `auto` COPYs straight into the table and, when a batch meets a row already "
        "stored (a redelivery), writes it and the batches after it (redeliveries come in runs) through a staged "
        "`INSERT … ON CONFLICT DO NOTHING`; `upsert` always stages (for tables with INSERT rules, which COPY does "
        "not apply)"))
    recovery_dsn: SecretStr = Field(SecretStr(""), description=(
        "DSN `unmask --query/--where` reads with instead of `dsn`: a role granted only SELECT on the table, "
        "so a recovery can read and nothing else; empty = `dsn`"))
    partitioned: bool = Field(True, description=(
        "create a missing table range-partitioned by month on create_date (plus a DEFAULT partition); an "
        "existing table keeps its layout: convert it online with `migrate --partition`"))
    partitions_ahead: int = Field(2, ge=0, le=36, description=(
        "months created ahead of the current one (by `migrate`, `run` and its periodic maintenance)"))
    indexes: str = Field("masked_ip,masked_device_id", description=(
        "comma-separated columns of a partitioned table that get a (partition-local) index, for analyst lookups: "
        "hash on the masked columns (tokens are pseudorandom: equality is the only lookup), btree on others; "
        "add user_id to make `erase` an index lookup; empty = none"))
    retention_days: int | None = Field(None, ge=1, description=(
        "keep this many days of rows: `run` applies `retention` periodically (drops whole old partitions, "
        "deletes the older rows of the rest in batches); unset = keep everything"))
    maintenance_interval: float = Field(3600, gt=0, description=(
        "seconds between the periodic table maintenance of `run` (partitions ahead, retention)"))

    @field_validator("indexes")
    @classmethod
    def _index_columns(cls, v: str) -> str:
        cols = [c.strip() for c in v.split(",") if c.strip()]
        allowed = ("user_id", "device_type", "masked_ip", "masked_device_id", "locale", "app_version")
        for c in cols:
            if c not in allowed:
                raise ValueError(f"{c!r} is not an indexable column (one of {', '.join(allowed)})")
        return ",".join(dict.fromkeys(cols))

    @property
    def index_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.indexes.split(",") if c)

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
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be a plain SQL identifier")
        if len(v) > TABLE_NAME_MAX:
            # PostgreSQL cuts longer names to 63 bytes with only a NOTICE: two months' partitions
            # would get one name, and the second CREATE would fail or be skipped.
            raise ValueError(f"at most {TABLE_NAME_MAX} characters: the names derived from it (partitions "
                             f"<table>_YYYY_MM, <table>_create_date_message_id_key, ...) must fit PostgreSQL's "
                             f"63-byte identifiers")
        return v


class MaskingSettings(_Section):
    """The key ring (see ``pipeline.keyring``): plain or KMS-wrapped keys from env or a file."""

    key: SecretStr = Field(SecretStr(""), description=(
        "`<key id>:<base64 key>` from `keygen` (or KMS-wrapped `<key id>:kms:<blob>`); the active key unless "
        "`active_key_id` says otherwise; empty (and no other key source) = generated local key (embedded only)"))
    keys: SecretStr = Field(SecretStr(""), description=(
        "more keys of the ring (old ones, to unmask and `rekey`), comma-separated entries like `key`"))
    key_file: str = Field("", description=(
        "file with one entry per line (`#` comments, blank lines ok); should be mode 600"))
    active_key_id: str = Field("", description=(
        "id of the key new rows are masked with; empty = `key`, else the first key found "
        "(`keys`, `key_file`, `kms_wrapped_keys` in that order)"))
    kms_key_id: str = Field("", description=(
        "KMS key (ARN, id or alias) for `keygen --kms-key-id`; when set, `Decrypt` only accepts blobs wrapped under it"))
    kms_wrapped_keys: str = Field("", description=(
        "KMS-wrapped entries `<key id>:kms:<blob>`, comma-separated, unwrapped with `Decrypt` at start-up"))
    kms_endpoint_url: str = Field("", description=(
        "KMS endpoint; empty = `sqs.endpoint_url` (LocalStack), else AWS; region = `sqs.region`"))
    audit_log: str = Field("", description=(
        "file `unmask`, `retention` and `erase` append their audit records to (besides stderr)"))

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
    batch_size: int = Field(2000, ge=1, le=100_000, description="rows per COPY batch")
    batch_timeout: float = Field(0.1, gt=0, le=60, description=(
        "seconds before a partial batch is flushed (while batches commit the next one fills, so a short "
        "timeout costs little)"))
    write_concurrency: int = Field(2, ge=1, le=16, description=(
        "COPY batch transactions in flight at once, each on one of `postgres.pool_size` connections (keep it "
        "below that); messages are still acked only after their rows commit, in batch order"))
    queue_size: int = Field(64, ge=1, description="capacity of each inter-stage queue (receive batches)")
    grace_seconds: float = Field(10, ge=0, description="drain time on SIGTERM before held messages are released")
    state_dir: Path = Field(Path(".pipeline"), description="embedded default's state")
    sample_size: int = Field(100, ge=0, description="valid events seeded into the embedded queue")
    progress_interval: float = Field(10, gt=0, description="seconds between progress log lines")
    max_decoded_bytes: int = Field(10 * 2**20, ge=1024, description=(
        "cap on one message's decompressed (gzip) payload, in bytes; a larger one is dead-lettered whole "
        "(`encoding.too_large`) without ever being expanded further"))
    max_events_per_message: int = Field(10_000, ge=1, description=(
        "cap on the events one message may carry (JSON array or newline-delimited); more is dead-lettered whole "
        "(`framing.too_many_events`)"))
    max_in_flight_rows: int = Field(100_000, ge=1, description=(
        "receiving pauses while the held messages carry this many events (a message of 1,000 events counts "
        "1,000; `sqs.max_in_flight` counts messages)"))
    max_in_flight_bytes: int = Field(128 * 2**20, ge=2**20, description=(
        "receiving pauses while the held messages' bodies and decompressed payloads reach this many bytes"))
    transform_workers: int | Literal["auto"] = Field("auto", description=(
        "processes that decode, validate and mask messages of 4 KiB and more (batches of events) beside each "
        "pipeline process, so its event loop keeps to I/O; `auto`: one per CPU left after the `processes` event "
        "loops (1 on two cores), 0 = all inline"))
    processes: int = Field(1, ge=1, le=64, description=(
        "worker processes `run` starts on the same queue (one core each); a dead worker is replaced with backoff "
        "(or the run fails past a restart budget); worker `i` serves HTTP on `http.port + i`"))

    @field_validator("transform_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> int | str:
        return _word_or_number(v, "auto", 0, 64)


class HttpSettings(_Section):
    port: int | None = Field(None, ge=1, le=65535, description=(
        "serve `/healthz`, `/readyz`, `/metrics` on this port; unset = no endpoint"))
    host: str = Field("0.0.0.0", description="address the endpoint listens on")


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
