"""``pipeline.aio``: the one spawn-and-pipe protocol (workers, bench phases) and the loop choice."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from pipeline import aio


def _reply(value: str, conn: Any) -> None:
    conn.send(("ok", value, os.getpid()))
    conn.close()


def _die(conn: Any) -> None:
    os._exit(3)  # no message: the parent must see EOF, not wait for ever


async def test_spawn_pipes_the_childs_message_then_eof() -> None:
    proc, conn = aio.spawn(_reply, "hello", name="aio-test")
    kind, value, pid = await aio.receive(conn)
    assert (kind, value, pid) == ("ok", "hello", proc.pid)
    with pytest.raises(EOFError):
        await aio.receive(conn)
    await asyncio.to_thread(proc.join, 10)
    assert proc.exitcode == 0


async def test_a_child_that_dies_silently_is_eof() -> None:
    proc, conn = aio.spawn(_die)
    with pytest.raises(EOFError):
        await asyncio.wait_for(aio.receive(conn), 30)
    await asyncio.to_thread(proc.join, 10)
    assert proc.exitcode == 3


def test_run_uses_the_named_loop() -> None:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert aio.loop_name().split(".")[0] in aio.run(which())
