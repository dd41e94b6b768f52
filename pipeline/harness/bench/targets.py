"""Where to run: LocalStack (or configured endpoints), a PostgreSQL, queues and tables of our own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any, AsyncIterator

from ...settings import Settings
from ..loadgen import producer_client
from .options import BenchOptions

__all__ = ["targets", "drop_table", "MOTO_MAX_COUNT"]

log = logging.getLogger("pipeline.bench")

MOTO_MAX_COUNT = 300  # the embedded moto broker slows down with every message it holds: keep a fallback run tiny


@contextlib.asynccontextmanager
async def targets(settings: Settings, opts: BenchOptions) -> AsyncIterator[tuple[Settings, dict]]:
    """Settings that point the benchmark at its own queues and table; torn down afterwards."""
    from pydantic import SecretStr

    from stages.masking import generate_key

    from botocore.exceptions import BotoCoreError, ClientError

    from ...embedded import CREDENTIALS, _start_postgres
    from ...clients import sqs_problem

    info: dict[str, Any] = {}
    stack = contextlib.ExitStack()
    with stack:
        endpoint = settings.sqs.endpoint_url
        if not (settings.sqs.endpoint_url or settings.sqs.queue_url):
            for k, v in CREDENTIALS.items():
                os.environ.setdefault(k, v)
            try:
                endpoint, info["broker"] = await asyncio.to_thread(_start_localstack, opts.cache_dir, stack)
            except RuntimeError as exc:  # no LocalStack (offline, no venv): the embedded broker, small
                log.warning("LocalStack unavailable, falling back to the embedded moto broker (slow: counts capped)",
                            extra={"error": str(exc).splitlines()[0]})
                endpoint = await asyncio.to_thread(_start_moto, settings.pipeline.state_dir, stack)
                info["broker"] = "moto (embedded fallback; LocalStack unavailable)"
                info["max_count"] = MOTO_MAX_COUNT
        else:
            info["broker"] = f"configured endpoint {endpoint or 'AWS'}"
        if settings.embedded_postgres:
            settings.pipeline.state_dir.mkdir(parents=True, exist_ok=True)
            dsn = await asyncio.to_thread(_start_postgres, settings.pipeline.state_dir)
        else:
            dsn = settings.postgres.dsn.get_secret_value()
        tag = f"bench-{secrets.token_hex(4)}"
        table = "bench_" + tag.split("-")[1]
        info["postgres_version"] = await _pg_version(settings, dsn)
        sqs = settings.sqs.model_copy(update={"endpoint_url": endpoint})
        async with producer_client(settings.model_copy(update={"sqs": sqs}), 4) as c:
            urls: dict[str, str] = {}
            try:
                try:
                    for name in ("broker", "pipeline", "dlq"):
                        urls[name] = (await c.create_queue(QueueName=f"{tag}-{name}"))["QueueUrl"]
                except (BotoCoreError, ClientError) as exc:
                    raise sqs_problem(exc, "creating benchmark queue", f"{tag}-…", endpoint) from None
                info["queues"] = urls
                yield settings.model_copy(update={
                    "sqs": sqs.model_copy(update={  # a short long-poll: no 10 s idle tail per phase
                        "queue_url": urls["pipeline"], "dlq_url": urls["dlq"],
                        "wait_time_seconds": min(settings.sqs.wait_time_seconds, 1)}),
                    "postgres": settings.postgres.model_copy(update={"dsn": SecretStr(dsn), "table": table}),
                    # A throwaway key, and no HTTP server: the benchmark must not touch a live deployment's.
                    "masking": type(settings.masking)(key=SecretStr(generate_key("bench").encode())),
                    "http": settings.http.model_copy(update={"port": None}),
                }), info
            finally:
                for url in urls.values():
                    with contextlib.suppress(Exception):
                        await c.delete_queue(QueueUrl=url)
                with contextlib.suppress(Exception):
                    await drop_table(dsn, table)


def _start_localstack(cache_dir: Path, stack: contextlib.ExitStack) -> tuple[str, str]:
    from .._services import LocalStack, installed

    if not installed(cache_dir.resolve() / "localstack-venv"):
        print(f"installing LocalStack 4.12 into {cache_dir / 'localstack-venv'} (once, ~1 min)…", file=sys.stderr)
    ls = LocalStack.start(cache_dir)
    stack.callback(ls.stop)
    return ls.endpoint, "LocalStack 4.12 (host mode, started for the benchmark)"


def _start_moto(state_dir: Path, stack: contextlib.ExitStack) -> str:
    from ...embedded import _start_broker

    state_dir.mkdir(parents=True, exist_ok=True)
    proc, endpoint = _start_broker(state_dir)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except Exception:  # noqa: BLE001
            proc.kill()

    stack.callback(stop)
    return endpoint


async def _pg_version(settings: Settings, dsn: str) -> str:
    from pydantic import SecretStr

    from ...clients import connect_postgres  # one-line errors for an unreachable or refusing server

    conn = await connect_postgres(settings.model_copy(update={
        "postgres": settings.postgres.model_copy(update={"dsn": SecretStr(dsn)})}))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def drop_table(dsn: str, table: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await conn.close()
