"""Wiring and lifecycle: build the stages, link them with bounded queues, run, drain, stop.

    SqsSource ──raw──▶ Transformer ──rows──▶ CopySink ──acks──▶ Acker ──▶ DeleteMessageBatch
         ▲                  └──────── dead letters ─────────────▶ │ ──▶ DLQ SendMessageBatch
         └──────────── Leases (in-flight cap, heartbeat, release) ◀┘

Shutdown is by sentinel: the source stops polling, ``None`` flows down the queues so each
stage finishes what it holds, and the acker drains last. If that takes longer than the
grace period, whatever is still held is released (visibility 0) for another consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import asyncpg
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from stages.acker import Acker
from stages.leases import Heartbeat, Leases, release
from stages.masking import KeyError_, Masker
from stages.sink import CopySink, create_stage_table
from stages.source import SqsSource
from stages.sqs import is_fifo, queue_name
from stages.transform import Transformer

from .keyring import load_masker
from .metrics import Stats
from .schema import migrate
from .dsn import dsn_hint, dsn_targets, redact_dsn, scrub_dsn_secrets
from .settings import Settings

__all__ = ["run", "Runtime", "PreflightError", "sqs_client", "connect_postgres", "masker_for"]

log = logging.getLogger("pipeline")


class PreflightError(Exception):
    """A dependency is missing or unreachable at start-up; one line for the operator."""


async def masker_for(settings: Settings) -> Masker:
    """The key ring, KMS-wrapped keys unwrapped; see ``pipeline.keyring``."""
    try:
        return await load_masker(settings)
    except KeyError_ as exc:
        raise PreflightError(str(exc)) from None


@contextlib.asynccontextmanager
async def sqs_client(
    settings: Settings, *, connect_timeout: float = 5, attempts: int = 4, concurrency: int | None = None,
    read_timeout: float | None = None, parameter_validation: bool = True,
) -> AsyncIterator[Any]:
    """The SQS client, one pooled keep-alive connection per concurrent call (receivers + ackers by default)."""
    s = settings.sqs
    config = AioConfig(
        max_pool_connections=(s.receivers + s.ackers if concurrency is None else concurrency) + 8,
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


def _sqs_problem(exc: BaseException, what: str, url: str, endpoint: str) -> PreflightError:
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
        raise _sqs_problem(exc, "queue", s.queue_url, s.endpoint_url) from None
    try:
        dlq = (await client.get_queue_attributes(QueueUrl=s.dlq_url, AttributeNames=["All"]))["Attributes"]
    except ClientError as exc:
        problem = _sqs_problem(exc, "dead-letter queue", s.dlq_url, s.endpoint_url)
        if not (s.create_dlq and str(problem).endswith("does not exist")):
            raise problem from None
        fifo = {"FifoQueue": "true"} if is_fifo(s.dlq_url) else {}
        try:
            await client.create_queue(QueueName=queue_name(s.dlq_url), Attributes=fifo)
        except (BotoCoreError, ClientError) as exc:
            raise _sqs_problem(exc, "creating the dead-letter queue", s.dlq_url, s.endpoint_url) from None
        log.info("created dead-letter queue", extra={"dlq_url": s.dlq_url})
        return attrs
    except BotoCoreError as exc:
        raise _sqs_problem(exc, "dead-letter queue", s.dlq_url, s.endpoint_url) from None
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


@dataclass(eq=False)
class Runtime:
    """Live state that the HTTP endpoint and progress reporting read."""

    settings: Settings
    stats: Stats = field(default_factory=Stats)
    leases: Leases | None = None
    queues: dict[str, asyncio.Queue] = field(default_factory=dict)
    source: SqsSource | None = None
    sink: CopySink | None = None
    acker: Acker | None = None
    client: Any = None
    pool: asyncpg.Pool | None = None
    running: bool = False
    backlog: dict[str, int] = field(default_factory=dict)


async def run(
    settings: Settings, *, until_empty: bool = False, stop: asyncio.Event | None = None,
    runtime: Runtime | None = None,
) -> dict:
    """Run the pipeline until ``stop`` is set (or the queue is drained); return the summary."""
    rt = runtime or Runtime(settings)
    stats = rt.stats
    stop = stop or asyncio.Event()
    s, p = settings.sqs, settings.pipeline
    masker = await masker_for(settings)
    async with contextlib.AsyncExitStack() as stack:
        if settings.http.port:  # first in, last out: probes answer while starting and draining
            from .http import serve

            await stack.enter_async_context(serve(rt, settings.http.host, settings.http.port))
        client = rt.client = await stack.enter_async_context(sqs_client(settings))
        await check_queues(client, settings)
        conn = await connect_postgres(settings)
        try:
            changes = await migrate(conn, settings.postgres.table)
        finally:
            await conn.close()
        if changes:
            log.info("migrated table", extra={"table": settings.postgres.table, "statements": len(changes)})
        table = settings.postgres.table
        pool = rt.pool = await asyncpg.create_pool(
            settings.postgres.dsn.get_secret_value(), min_size=1, max_size=settings.postgres.pool_size,
            init=lambda c: create_stage_table(c, table), command_timeout=60,
        )
        stack.push_async_callback(pool.close)

        raw: asyncio.Queue = asyncio.Queue(p.queue_size)
        rows: asyncio.Queue = asyncio.Queue(p.queue_size)
        acks: asyncio.Queue = asyncio.Queue(p.queue_size * 4)
        rt.queues = {"raw": raw, "rows": rows, "acks": acks}
        leases = rt.leases = Leases(s.max_in_flight)
        source = rt.source = SqsSource(
            client, s.queue_url, raw, leases, stats,
            receivers=s.receivers, wait_time_seconds=s.wait_time_seconds, visibility_timeout=s.visibility_timeout,
        )
        transformer = Transformer(raw, rows, acks, masker, stats, s.max_receive_count)
        sink = rt.sink = CopySink(
            pool, table, rows, acks, stats, batch_size=p.batch_size, batch_timeout=p.batch_timeout,
        )
        acker = rt.acker = Acker(client, s.queue_url, s.dlq_url, acks, leases, stats, s.ackers)
        heartbeat = Heartbeat(client, s.queue_url, leases, stats, s.visibility_timeout or 30)

        source_task = asyncio.create_task(source.run(), name="source")
        stage_tasks = [
            asyncio.create_task(transformer.run(), name="transformer"),
            asyncio.create_task(sink.run(), name="sink"),
            asyncio.create_task(acker.run(), name="acker"),
        ]
        helpers = [
            asyncio.create_task(heartbeat.run(), name="heartbeat"),
            asyncio.create_task(_progress(rt, p.progress_interval), name="progress"),
        ]
        if until_empty:
            helpers.append(asyncio.create_task(_until_empty(rt, stop), name="until-empty"))
        rt.running = True
        log.info("pipeline started", extra={"queue_url": s.queue_url, "table": table, "receivers": s.receivers,
                                            "batch_size": p.batch_size, "key_id": masker.active})
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, source_task, *stage_tasks], return_when=asyncio.FIRST_COMPLETED)
            crashed = [t for t in done if t is not stopper and not t.cancelled() and t.exception() is not None]
            if crashed:
                raise crashed[0].exception()  # type: ignore[misc]
            log.info("draining", extra={"held": len(leases)})
            # --until-empty saw the queue empty: no need to let empty long polls run out.
            emptied = any(t.get_name() == "until-empty" and t.done() for t in helpers)
            source.stop(finish_calls=not emptied)
            try:  # one grace period for all of it: a stuck sink must not keep `raw.put` waiting
                await asyncio.wait_for(_drain(source_task, raw, stage_tasks), p.grace_seconds)
            except asyncio.TimeoutError:
                log.warning("grace period over, releasing unfinished messages", extra={"held": len(leases)})
        finally:
            rt.running = False
            stopper.cancel()
            for t in [source_task, *stage_tasks, *helpers]:
                t.cancel()
            await asyncio.gather(source_task, *stage_tasks, *helpers, return_exceptions=True)
            if len(leases):
                await release(client, s.queue_url, leases, stats)
    summary = stats.summary()
    # Distinct messages whose dead letter SQS refused for good, by error code: they are still on the source queue.
    summary["not_dead_lettered"] = dict(Counter(acker.refused.values()))
    log.info("pipeline stopped", extra=summary)
    return summary


async def _drain(source_task: asyncio.Task, raw: asyncio.Queue, stage_tasks: list[asyncio.Task]) -> None:
    """Let the stopped source hand on its last messages, then send the sentinel down the stages."""
    await source_task
    await raw.put(None)
    await asyncio.gather(*stage_tasks)


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


def _idle(rt: Runtime) -> bool:
    return len(rt.leases or ()) == 0 and all(q.empty() for q in rt.queues.values())


async def _until_empty(rt: Runtime, stop: asyncio.Event, interval: float = 0.5) -> None:
    """Stop once the queue has nothing visible, in flight or delayed, and we hold nothing.

    Nothing, that is, but the messages whose dead letters SQS refused: they return after each
    visibility timeout and are refused again, so waiting for them would never end. The run then
    ends and the CLI reports them (``not_dead_lettered``) with a non-zero exit.

    Messages in flight elsewhere (a crashed consumer's) count: we wait for them to become
    visible again and process them, so a restart after a crash really drains the queue.
    """
    quiet = 0
    while True:
        await asyncio.sleep(interval)
        try:
            rt.backlog = await queue_backlog(rt.client, rt.settings.sqs.queue_url)
        except (BotoCoreError, ClientError, OSError) as exc:
            rt.stats.errors["sqs"] += 1
            log.warning("queue attributes unavailable", extra={"error": type(exc).__name__})
            quiet = 0
            continue
        # Messages whose dead letter SQS refused stay on the queue for good: they must not keep us waiting.
        refused = len(rt.acker.refused) if rt.acker is not None else 0
        if sum(rt.backlog.values()) <= refused and _idle(rt):
            quiet += 1
            if quiet >= 2:
                stop.set()
                return
        else:
            quiet = 0


async def _progress(rt: Runtime, interval: float) -> None:
    stats = rt.stats
    last, last_t = 0, time.monotonic()
    while True:
        await asyncio.sleep(interval)
        if rt.client is not None:  # the backlog, for this line and for /metrics
            with contextlib.suppress(BotoCoreError, ClientError, OSError, asyncio.TimeoutError):
                rt.backlog = await asyncio.wait_for(queue_backlog(rt.client, rt.settings.sqs.queue_url), 5)
        now = time.monotonic()
        log.info("progress", extra={
            "rate_per_s": round((stats.inserted - last) / (now - last_t), 1),
            "received": stats.received, "inserted": stats.inserted, "duplicates": stats.duplicates,
            "rejected": stats.rejected, "acked": stats.acked, "held": len(rt.leases or ()),
            "backlog": rt.backlog,
        })
        last, last_t = stats.inserted, now
