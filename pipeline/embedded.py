"""The embedded default: a local PostgreSQL (pgserver) and SQS-compatible broker (moto).

With the shipped ``config.toml`` nothing is configured, so ``run`` starts both under
``[pipeline].state_dir``, creates the queue and its DLQ, seeds a sample on first use and
masks with a generated local key. PostgreSQL's data persists in the state folder, so a
rerun is safe; the broker keeps its queue in memory, which is why the sample is seeded
only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import AsyncIterator

from pydantic import SecretStr

from stages.masking import generate_key
from stages.sqs import chunks

from .sample import MALFORMED, WRONG_TYPE, sample_bodies
from .settings import Settings

__all__ = ["embedded", "local_key", "free_port", "wait_http_ok"]

log = logging.getLogger("pipeline.embedded")

QUEUE = "login-queue"
DLQ = "login-queue-dlq"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` dies meanwhile.

    Proxies are bypassed: the services always live on 127.0.0.1.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with opener.open(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f}s")


def local_key(state_dir: Path) -> str:
    """The embedded default's masking key, generated on first use (mode 0600)."""
    path = state_dir / "masking.key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate_key("local").encode() + "\n")
    return path.read_text().strip()


def _start_postgres(state_dir: Path) -> str:
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR", module="platformdirs")
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    try:
        import pgserver
    except ImportError:
        raise RuntimeError("the embedded PostgreSQL needs the 'embedded' extra: pip install -e '.[embedded]'") from None
    server = pgserver.get_server(state_dir / "pg", cleanup_mode="stop")
    return server.get_uri()


def _start_broker(state_dir: Path) -> tuple[subprocess.Popen, str]:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise RuntimeError("the embedded SQS broker needs the 'embedded' extra: pip install -e '.[embedded]'") from None
    port = free_port()
    with open(state_dir / "broker.log", "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(endpoint + "/moto-api/", 30, proc)
    except (RuntimeError, TimeoutError):
        proc.kill()
        raise RuntimeError(f"embedded SQS broker did not start; see {state_dir / 'broker.log'}") from None
    return proc, endpoint


@contextlib.asynccontextmanager
async def embedded(settings: Settings, *, broker: bool = True, key: bool = True) -> AsyncIterator[Settings]:
    """Start what the settings leave unconfigured; yield settings that point at it.

    ``broker=False`` and ``key=False`` are for commands that need only the database.
    """
    if not settings.embedded:
        yield settings
        return
    state = settings.pipeline.state_dir
    state.mkdir(parents=True, exist_ok=True)
    sqs, pg, masking = {}, {}, {}
    proc = None
    try:
        if settings.embedded_postgres:
            pg["dsn"] = SecretStr(await asyncio.to_thread(_start_postgres, state))
            log.info("embedded PostgreSQL started", extra={"data_dir": str(state / "pg")})
        if broker and settings.embedded_sqs:
            for k, v in CREDENTIALS.items():
                os.environ.setdefault(k, v)
            proc, endpoint = await asyncio.to_thread(_start_broker, state)
            sqs = {"endpoint_url": endpoint, **await _queues(settings, endpoint, state)}
            log.info("embedded SQS broker started", extra={"endpoint": endpoint})
        if key and not settings.masking.configured:
            masking["key"] = SecretStr(local_key(state))
            log.warning("using the embedded default's generated local masking key; set PIPELINE_MASKING__KEY in production",
                        extra={"key_file": str(state / "masking.key")})
        yield settings.model_copy(update={
            "sqs": settings.sqs.model_copy(update=sqs),
            "postgres": settings.postgres.model_copy(update=pg),
            "masking": settings.masking.model_copy(update=masking),
        })
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _queues(settings: Settings, endpoint: str, state: Path) -> dict[str, str]:
    from aiobotocore.session import get_session

    async with get_session().create_client("sqs", region_name=settings.sqs.region, endpoint_url=endpoint) as c:
        queue_url = (await c.create_queue(QueueName=QUEUE))["QueueUrl"]
        dlq_url = (await c.create_queue(QueueName=DLQ))["QueueUrl"]
        marker = state / "seeded"
        if not marker.exists():
            bodies = sample_bodies(settings.pipeline.sample_size, seed=2026) + [WRONG_TYPE, *MALFORMED]
            for batch in chunks(bodies):
                await c.send_message_batch(
                    QueueUrl=queue_url, Entries=[{"Id": str(j), "MessageBody": b} for j, b in enumerate(batch)])
            marker.write_text(f"{len(bodies)}\n")
            log.info("seeded the embedded queue with a sample", extra={"messages": len(bodies)})
        else:
            log.info("embedded sample already seeded on an earlier run; delete the state folder to start over",
                     extra={"state_dir": str(state)})
    return {"queue_url": queue_url, "dlq_url": dlq_url}
