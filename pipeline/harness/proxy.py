"""A TCP proxy that adds a network round trip, for benchmarks and tests at real-world latencies.

Real SQS answers in 10–20 ms within a region and 50 ms or more across regions; LocalStack on
loopback answers in well under one. This kernel has no ``netem``, so the delay is added here:
every chunk read from either side is written to the other ``rtt / 2`` later. Chunks are
delayed, not serialised behind each other: a connection keeps its bandwidth and every request
pays one round trip, as on a long wire. Order within a connection is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

__all__ = ["latency_proxy", "LatencyProxy"]


class LatencyProxy:
    def __init__(self, upstream_host: str, upstream_port: int, rtt_s: float) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = rtt_s / 2
        self.server: asyncio.Server | None = None
        self.port = 0
        self._conns: set[asyncio.Task] = set()

    async def start(self, host: str = "127.0.0.1") -> None:
        self.server = await asyncio.start_server(self._serve, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            self._conns.discard(task)
            return
        try:
            await asyncio.gather(self._pipe(client_r, up_w), self._pipe(up_r, client_w))
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a peer hung up, or ``close``: asyncio's stream callback must not see a cancelled task
        finally:
            for w in (client_w, up_w):
                w.close()
            self._conns.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy ``reader`` to ``writer``, each chunk ``delay`` after it arrived."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await chunks.get()
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(forward())
        try:
            while True:
                data = await reader.read(65536)
                chunks.put_nowait((loop.time() + self.delay, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()


@contextlib.asynccontextmanager
async def latency_proxy(endpoint_url: str, rtt_ms: float) -> AsyncIterator[str]:
    """An endpoint URL that reaches ``endpoint_url`` with ``rtt_ms`` added to every round trip.

    ``rtt_ms == 0`` yields ``endpoint_url`` itself: no proxy, no cost.
    """
    if rtt_ms <= 0:
        yield endpoint_url
        return
    parts = urlsplit(endpoint_url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the latency proxy forwards plain http endpoints only, not {endpoint_url!r}")
    proxy = LatencyProxy(parts.hostname, parts.port or 80, rtt_ms / 1000)
    await proxy.start()
    try:
        yield urlunsplit(("http", f"127.0.0.1:{proxy.port}", parts.path, "", ""))
    finally:
        await proxy.close()
