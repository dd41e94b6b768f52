"""The sidecar endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` on ``http.port``.

Started by ``runner.run`` before the pre-flight checks, so a liveness or startup probe
answers while the pipeline connects; ``/readyz`` says 503 until the stages run and again
once draining starts, so a load balancer or Kubernetes stops counting on an instance
that is going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any, AsyncIterator

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .errors import PreflightError
from .metrics import registry_for

__all__ = ["serve", "Readiness"]

log = logging.getLogger("pipeline.http")


class Readiness:
    """What keeps a runtime from being ready, with the PostgreSQL probe cached briefly.

    Probes may come every second from several sources (kubelet, load balancer, humans);
    one ``SELECT 1`` per ``ttl`` is plenty, and a lock keeps them from piling up while the
    database is slow.
    """

    def __init__(self, runtime: Any, *, ttl: float = 1.5, timeout: float = 1.0) -> None:
        self.rt, self.ttl, self.timeout = runtime, ttl, timeout
        self._pg: tuple[float, str | None] = (float("-inf"), "not checked yet")
        self._lock = asyncio.Lock()

    async def problems(self) -> dict[str, str]:
        rt = self.rt
        if not rt.running:
            return {"stages": "starting" if rt.pool is None else "not running (draining or stopped)"}
        out = {}
        if rt.source is not None and not rt.source.last_poll_ok:
            out["sqs"] = "the last receive from SQS failed"
        refused = getattr(rt.acker, "refused", None)
        if refused:
            codes = ", ".join(f"{code}: {n}" for code, n in sorted(Counter(refused.values()).items()))
            out["dlq"] = f"{len(refused)} message(s) could not be dead-lettered ({codes}); they stay on the source queue"
        if rt.sink is not None and not rt.sink.healthy:
            out["postgres"] = "the last database write failed; retrying"
        pg = await self._postgres()
        if pg is not None:
            out["postgres"] = pg
        return out

    async def _postgres(self) -> str | None:
        checked, problem = self._pg
        if time.monotonic() - checked < self.ttl:
            return problem
        async with self._lock:
            checked, problem = self._pg
            if time.monotonic() - checked < self.ttl:
                return problem
            problem = await self._select_1()
            self._pg = (time.monotonic(), problem)
            return problem

    async def _select_1(self) -> str | None:
        pool = self.rt.pool
        if pool is None:
            return "no connection pool"
        try:
            async with asyncio.timeout(self.timeout):
                async with pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
        except TimeoutError:
            return f"SELECT 1 took longer than {self.timeout:g} s"
        except Exception as exc:  # any failure means "not ready"; say which, without the DSN
            return f"SELECT 1 failed: {type(exc).__name__}"
        return None


def _json(data: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def make_app(runtime: Any, registry: CollectorRegistry | None = None) -> web.Application:
    registry = registry or registry_for(runtime)
    readiness = Readiness(runtime)

    async def healthz(request: web.Request) -> web.Response:
        # Answering at all proves the process and its event loop are alive.
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        problems = await readiness.problems()
        if problems:
            return _json({"ready": False, "not_ready": problems}, status=503)
        return _json({"ready": True})

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


@contextlib.asynccontextmanager
async def serve(runtime: Any, host: str, port: int) -> AsyncIterator[web.AppRunner]:
    """Serve ``runtime``'s endpoint on ``host:port`` until the block exits."""


    runner = web.AppRunner(make_app(runtime), access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise PreflightError(f"HTTP endpoint {host}:{port}: {exc.strerror or exc}") from None
    log.info("http endpoint listening", extra={"host": host, "port": port, "paths": ["/healthz", "/readyz", "/metrics"]})
    try:
        yield runner
    finally:
        await runner.cleanup()
