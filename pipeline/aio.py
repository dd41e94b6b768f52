"""Process and event-loop plumbing shared by the CLI, the worker processes and the load harness.

One place decides the event loop (uvloop when installed: measurably cheaper per message, see
the README's levers; asyncio otherwise) and one place spawns a child process with a pipe back,
so a worker and a benchmark phase start, report and end the same way.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import Executor
from typing import Any, Callable, Coroutine, TypeVar

__all__ = ["run", "loop_name", "SPAWN", "spawn", "receive"]

T = TypeVar("T")

# Spawned, never forked: a child must not inherit the parent's event loop, sockets or clients.
SPAWN = multiprocessing.get_context("spawn")


def _uvloop() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return None
    return uvloop


def loop_name() -> str:
    """The event loop ``run`` uses, for reports."""
    return "uvloop" if _uvloop() is not None else "asyncio"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed."""
    uvloop = _uvloop()
    return uvloop.run(coro) if uvloop is not None else asyncio.run(coro)


def spawn(target: Callable[..., None], *args: Any, name: str | None = None,
          daemon: bool | None = None) -> tuple[Any, Any]:
    """Start ``target(*args, conn)`` in a spawned process; return the process and the read end of ``conn``.

    The parent closes its copy of the write end at once, so once the child is gone (however it
    ends) a read raises ``EOFError`` instead of waiting for ever.
    """
    recv, send = SPAWN.Pipe(duplex=False)
    proc = SPAWN.Process(target=target, args=(*args, send), name=name, daemon=daemon)
    proc.start()
    send.close()
    return proc, recv


async def receive(conn: Any, executor: Executor | None = None) -> Any:
    """The child's next message, read in a thread so the event loop keeps running; ``EOFError`` once it is gone."""
    return await asyncio.get_running_loop().run_in_executor(executor, conn.recv)
