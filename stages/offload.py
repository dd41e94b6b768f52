"""Transform workers: messages of many events are decoded, validated and masked in other processes.

One pipeline is one event loop, and a message of a hundred events costs it about 650 µs of
parsing, validation and AES-SIV, against a few µs per message for everything else (receive,
COPY, delete). So the transformer hands such messages (bodies of ``MIN_BYTES`` and more) to a
small pool of processes and keeps its loop for I/O; on a host with a core to spare, batched
messages drain on two cores instead of one (``bench`` phase (d)). A one-event message is
transformed inline, as before: sending it to another process would cost more than the work.

Workers run ``transform.transform_message``, the function the inline path runs, and send back
its plain-data outcome (``One``, ``Many`` or ``Reject``). Origin authentication and the poison
check stay in the pipeline's process, before anything is sent, and workers hold only the
active masking key: they mask, they never unmask nor authenticate. They ignore SIGINT (a
Ctrl-C reaches the whole process group; the pipeline drains and then stops them).

A worker that dies breaks the pool: the transformer transforms the batch at hand itself and
a new pool starts with the next big message (``events.transform_workers_failed``), so nothing
is lost or duplicated by it. A worker whose pipeline process is gone (killed, so it could not
stop them) exits by itself: nothing is left behind.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .decode import Decoding
from .leases import LONG_BODY_BYTES
from .masking import Masker, MaskingKey
from .transform import transform_message

__all__ = ["TransformPool", "MIN_BYTES", "default_workers", "usable_cpus"]

MIN_BYTES = LONG_BODY_BYTES  # smaller bodies (one event is ~200 bytes) are transformed inline

_worker: tuple[Masker, Decoding] | None = None


def default_workers(processes: int = 1) -> int:
    """Worker processes for ``auto``: the CPUs we may use, less one event loop per pipeline process."""
    return max(0, min(usable_cpus() // max(1, processes) - 1, 8))


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's limit)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _init(key: MaskingKey, how: Decoding) -> None:
    global _worker
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal to the process group is the pipeline's to handle:
        signal.signal(sig, signal.SIG_IGN)      # it drains, then stops its workers itself
    _worker = (Masker([key]), how)
    parent = multiprocessing.parent_process()
    if parent is not None:  # the pipeline killed (-9, OOM): no pipe tells the worker, its own copy keeps it open
        threading.Thread(target=_exit_with, args=(parent.sentinel,), name="parent-watch", daemon=True).start()


def _exit_with(sentinel: Any) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


def _run(messages: list[tuple]) -> list:
    masker, how = _worker  # type: ignore[misc]
    return [transform_message(*args, masker, how) for args in messages]


class TransformPool:
    """A lazily started pool of spawned processes; ``submit`` answers ``None`` when it cannot take the work."""

    def __init__(self, workers: int, masker: Masker, how: Decoding) -> None:
        self.workers, self._key, self._how = workers, masker.active_key(), how
        self._pool: ProcessPoolExecutor | None = None
        self._generation = 0  # which pool a batch went to: only the current one may be dropped

    def wants(self, body: str | bytes) -> bool:
        return self.workers > 0 and len(body) >= MIN_BYTES

    def submit(self, messages: list[tuple]) -> tuple[int, asyncio.Future] | None:
        """``(pool generation, future of the outcomes of messages in order)``; ``messages`` are
        ``transform_message``'s arguments without masker and decoding. ``None``: do them inline
        (the pool is broken, or a worker could not even be started)."""
        try:
            if self._pool is None:
                self._generation += 1
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init, initargs=(self._key, self._how))
            return self._generation, asyncio.wrap_future(self._pool.submit(_run, messages))
        except (BrokenProcessPool, OSError, RuntimeError):  # broken, or no process to be had (memory, limits)
            self.reset(self._generation)
            return None

    def reset(self, generation: int) -> bool:
        """Drop pool ``generation`` if it is still the current one (and say so): each batch that was
        under way on a broken pool reports it, and the pool that replaced it must survive them.
        Nothing is cancelled: the broken pool's batches fail by themselves."""
        if generation != self._generation or self._pool is None:
            return False
        pool, self._pool = self._pool, None
        pool.shutdown(wait=False)
        return True

    def close(self) -> None:
        """At the end of the run, once the transformer has every outcome: the workers exit, and are reaped."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
