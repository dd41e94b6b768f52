"""``run_workers`` supervision: a dead worker is logged, replaced and counted; past the budget the
parent fails; every incarnation's counts reach the summary. Fake workers, real processes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.metrics import Stats
from pipeline.errors import PreflightError
from pipeline.settings import Settings
from pipeline.workers import WorkerFailure, describe_exit, run_workers
from tests import worker_fakes

FAST = {"restart_window": 60.0, "backoff": (0.01, 0.05)}


def settings(processes: int = 2) -> Settings:
    return Settings(pipeline={"processes": processes, "progress_interval": 60, "grace_seconds": 1})


def test_describe_exit_names_signals() -> None:
    assert describe_exit(-9) == "SIGKILL"
    assert describe_exit(3) == "exit code 3"


def test_a_killed_worker_is_logged_replaced_and_its_counts_kept(tmp_path: Path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FAKE_WORKER_DIR", str(tmp_path))
    rt = SimpleNamespace(stats=Stats(), backlog={})
    with caplog.at_level(logging.INFO, logger="pipeline"):
        summary = asyncio.run(run_workers(settings(), until_empty=True, stop=asyncio.Event(), runtime=rt,
                                          target=worker_fakes.killed_once_then_finish, **FAST))
    died = [r for r in caplog.records if r.getMessage() == "worker died"]
    assert len(died) == 2 and all(r.levelno == logging.ERROR and r.exit == "SIGKILL" and r.pid for r in died)
    assert {r.worker for r in died} == {0, 1}
    assert summary["worker_restarts"] == 2 and summary["worker_deaths"] == 2 and summary["processes"] == 2
    # two incarnations per slot: the killed one's last snapshot plus the replacement's summary
    assert summary["inserted"] == 4 * worker_fakes.COUNTS["inserted"]
    assert summary["rejected_by_rule"] == {"ip.invalid": 4}
    assert rt.stats.acked == 4 * worker_fakes.COUNTS["acked"] and rt.worker_restarts == 2


def test_deaths_past_the_restart_budget_fail_the_parent(caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="pipeline"), pytest.raises(WorkerFailure, match="restart budget of 2"):
        asyncio.run(run_workers(settings(1), until_empty=False, stop=asyncio.Event(),
                                target=worker_fakes.die_at_once, restart_budget=2, **FAST))
    died = [r for r in caplog.records if r.getMessage() == "worker died"]
    assert len(died) == 3 and {r.exit for r in died} == {"exit code 3"}
    delays = [r.in_s for r in caplog.records if r.getMessage() == "restarting worker"]
    assert delays == [0.01, 0.02]  # exponential backoff


def test_a_configuration_error_is_fatal_at_once() -> None:
    with pytest.raises(PreflightError, match="PIPELINE_MASKING__KEY"):
        asyncio.run(run_workers(settings(), until_empty=True, stop=asyncio.Event(),
                                target=worker_fakes.fatal_config, **FAST))
