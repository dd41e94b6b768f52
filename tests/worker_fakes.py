"""Stand-in worker processes for ``run_workers`` unit tests: they die or report on cue, no services.

Spawned processes import their target by module path, so these live outside the test modules.
``FAKE_WORKER_DIR`` (inherited environment) is where a fake marks that it already ran once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

COUNTS = {"received": 5, "inserted": 4, "duplicates": 0, "rejected": 1, "acked": 5, "ack_failures": 0,
          "released": 0, "visibility_extended": 0, "rejected_by_rule": {"ip.invalid": 1}, "errors": {}}


def die_at_once(settings: Any, until_empty: bool, index: int, level: str, conn: Any) -> None:
    os._exit(3)


def killed_once_then_finish(settings: Any, until_empty: bool, index: int, level: str, conn: Any) -> None:
    """First incarnation of each slot: one snapshot, then SIGKILL; the next one reports a summary."""
    marker = Path(os.environ["FAKE_WORKER_DIR"]) / str(index)
    if not marker.exists():
        marker.touch()
        conn.send(("stats", dict(COUNTS, elapsed_s=0.1, rate_per_s=40.0), {"visible": 3, "in_flight": 5, "delayed": 0}))
        os.kill(os.getpid(), signal.SIGKILL)
    conn.send(("summary", dict(COUNTS, elapsed_s=0.2, rate_per_s=20.0)))
    conn.close()


def fatal_config(settings: Any, until_empty: bool, index: int, level: str, conn: Any) -> None:
    conn.send(("fatal", "no masking key: set PIPELINE_MASKING__KEY"))
    conn.close()
