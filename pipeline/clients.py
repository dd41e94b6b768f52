"""Clients of the dependencies, and the start-up checks on them: SQS, PostgreSQL, the key ring.

Commands and the runner get their connections here, and every way a dependency can be missing
or unreachable at start-up becomes one ``PreflightError`` line for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, AsyncIterator

import asyncpg
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from stages.masking import KeyError_, Masker
from stages.sqs import is_fifo, queue_name

from .dsn import dsn_hint, dsn_targets, redact_dsn, scrub_dsn_secrets
from .errors import PreflightError
from .keyring import load_masker
from .settings import Settings

__all__ = [
    "masker_for", "sqs_client", "sqs_problem", "check_queues", "queue_pair_problem", "connect_postgres",
    "queue_backlog", "backlog_of", "BACKLOG_ATTRIBUTES",
]

log = logging.getLogger("pipeline")


async def masker_for(settings: Settings) -> Masker:
    """The key ring, KMS-wrapped keys unwrapped; see ``pipeline.keyring``."""
    try:
        return await load_masker(settings)
    except KeyError_ as exc:
        raise PreflightError(str(exc)) from None


# Connections beyond the receive and delete limits: stages.leases.VISIBILITY_CALLS heartbeat calls,
# stages.acker.DEAD_LETTER_LANES, and a backlog poll (test_leases keeps this in step).
OTHER_CALLS = 20


@contextlib.asynccontextmanager
async def sqs_client(
    settings: Settings, *, connect_timeout: float = 5, attempts: int = 4, concurrency: int | None = None,
    read_timeout: float | None = None, parameter_validation: bool = True,
) -> AsyncIterator[Any]:
    """The SQS client, one pooled keep-alive connection per concurrent call (by default the most receive and
    delete calls the adaptive limits allow; connections open only when used)."""
    s = settings.sqs
    config = AioConfig(
        max_pool_connections=(s.max_concurrency() if concurrency is None else concurrency) + OTHER_CALLS,
        connect_timeout=connect_timeout,
        read_timeout=s.wait_time_seconds + 15 if read_timeout is None else read_timeout,
        retries={"mode": "standard", "max_attempts": attempts},
        tcp_keepalive=True,
        parameter_validation=parameter_validation,
    )
    async with get_session().create_client(
        "sqs", region_name=s.region, endpoint_url=s.endpoint_url or None, config=config
    ) as client:
        yield client


def sqs_problem(exc: BaseException, what: str, url: str, endpoint: str) -> PreflightError:
    if isinstance(exc, EndpointConnectionError):
        return PreflightError(f"SQS endpoint {endpoint or 'AWS'} is unreachable ({what} {url})")
    if isinstance(exc, NoCredentialsError):
        return PreflightError("no AWS credentials found (standard chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, role)")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "")
        if "NonExistentQueue" in code or "QueueDoesNotExist" in code:
            return PreflightError(f"{what} {url} does not exist")
        return PreflightError(f"SQS refused {what} {url}: {code}: {err.get('Message', '')}")
    return PreflightError(f"SQS {what} {url}: {type(exc).__name__}: {exc}")


async def check_queues(client: Any, settings: Settings) -> dict[str, str]:
    """Attributes of the source queue; the DLQ must exist too (created if ``create_dlq``), differ from
    the source and be of its type (standard or FIFO)."""
    s = settings.sqs
    if not s.dlq_url:
        raise PreflightError("sqs.dlq_url is not set (PIPELINE_SQS__DLQ_URL): rejected messages need a dead-letter queue")
    try:
        attrs = (await client.get_queue_attributes(QueueUrl=s.queue_url, AttributeNames=["All"]))["Attributes"]
    except (BotoCoreError, ClientError) as exc:
        raise sqs_problem(exc, "queue", s.queue_url, s.endpoint_url) from None
    try:
        dlq = (await client.get_queue_attributes(QueueUrl=s.dlq_url, AttributeNames=["All"]))["Attributes"]
    except ClientError as exc:
        problem = sqs_problem(exc, "dead-letter queue", s.dlq_url, s.endpoint_url)
        if not (s.create_dlq and str(problem).endswith("does not exist")):
            raise problem from None
        fifo = {"FifoQueue": "true"} if is_fifo(s.dlq_url) else {}
        try:
            await client.create_queue(QueueName=queue_name(s.dlq_url), Attributes=fifo)
        except (BotoCoreError, ClientError) as exc:
            raise sqs_problem(exc, "creating the dead-letter queue", s.dlq_url, s.endpoint_url) from None
        log.info("created dead-letter queue", extra={"dlq_url": s.dlq_url})
        return attrs
    except BotoCoreError as exc:
        raise sqs_problem(exc, "dead-letter queue", s.dlq_url, s.endpoint_url) from None
    problem = queue_pair_problem(attrs, dlq)
    if problem:
        raise PreflightError(problem)
    return attrs


def queue_pair_problem(source: dict[str, str], dlq: dict[str, str]) -> str | None:
    """Why this DLQ cannot take this source's dead letters, judged from both queues' attributes."""
    if source.get("QueueArn") and source.get("QueueArn") == dlq.get("QueueArn"):
        return (f"the dead-letter queue is the source queue ({source['QueueArn']}): rejected messages would "
                "come straight back; set sqs.dlq_url to another queue")
    src_fifo, dlq_fifo = source.get("FifoQueue") == "true", dlq.get("FifoQueue") == "true"
    if src_fifo != dlq_fifo:
        kind = {True: "FIFO", False: "standard"}
        return (f"the source queue is {kind[src_fifo]} but the dead-letter queue is {kind[dlq_fifo]}: "
                "a DLQ must be of its source's type")
    return None


async def connect_postgres(settings: Settings, timeout: float = 10) -> asyncpg.Connection:
    """Connect, or raise ``PreflightError`` naming the address the driver tried, never the password."""
    dsn = settings.postgres.dsn.get_secret_value()
    where, hint = redact_dsn(dsn), dsn_hint(dsn)
    try:
        return await asyncpg.connect(dsn, timeout=timeout)
    except asyncpg.InvalidPasswordError:
        raise PreflightError(f"PostgreSQL at {where}: authentication failed{hint}") from None
    except asyncpg.InvalidCatalogNameError:
        raise PreflightError(f"PostgreSQL at {where}: database does not exist{hint}") from None
    except ValueError as exc:  # ClientConfigurationError too; its message may quote a misread password piece
        why = "it cannot be parsed" if hint else scrub_dsn_secrets(str(exc), dsn)
        raise PreflightError(f"PostgreSQL DSN {where} is invalid: {why}{hint}") from None
    except asyncpg.PostgresError as exc:  # the server answered: a role, pg_hba or connection-limit refusal
        raise PreflightError(f"PostgreSQL at {where} refused the connection: "
                             f"{scrub_dsn_secrets(str(exc), dsn)}{hint}") from None
    except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError) as exc:
        targets = dsn_targets(dsn)
        tried = f" (tried {', '.join(targets)})" if targets else ""
        raise PreflightError(f"PostgreSQL at {where} is unreachable: {_pg_reason(exc, dsn, timeout)}{tried}{hint}") from None


def _pg_reason(exc: BaseException, dsn: str, timeout: float) -> str:
    """Why a connection failed, without the driver's text when it may quote a misread password piece."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() and exc.strerror[1:2].islower() else exc.strerror
    if dsn_hint(dsn):
        return type(exc).__name__
    return scrub_dsn_secrets(" ".join(str(exc).split()), dsn) or type(exc).__name__


# The queue's backlog as SQS reports it (approximate), under the names the summary, /metrics and check use.
BACKLOG_ATTRIBUTES = {"visible": "ApproximateNumberOfMessages", "in_flight": "ApproximateNumberOfMessagesNotVisible",
                      "delayed": "ApproximateNumberOfMessagesDelayed"}


def backlog_of(attrs: dict[str, str]) -> dict[str, int]:
    """``visible``, ``in_flight`` and ``delayed`` from a ``GetQueueAttributes`` answer."""
    return {name: int(attrs.get(attr, 0)) for name, attr in BACKLOG_ATTRIBUTES.items()}


async def queue_backlog(client: Any, queue_url: str) -> dict[str, int]:
    """The queue's backlog; raises what ``GetQueueAttributes`` raises (a missing queue included)."""
    attrs = (await client.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=list(BACKLOG_ATTRIBUTES.values())))["Attributes"]
    return backlog_of(attrs)
