"""``loadgen``, ``bench`` and ``processes = N`` against the fixtures' LocalStack and PostgreSQL.

These check that the harness works and that its output is well-formed; they never assert a
timing or a ratio's value (the machine running the tests decides those).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from stages.masking import generate_key
from tests.helpers import REPO, drain, fetch, pipeline_env, queue_counts, run_cli

KEY = generate_key("bench").encode()
PHASE_KEYS = {"messages", "seconds", "rate_per_s", "cpu_s", "cpu_s_per_10k", "peak_rss_mb", "latency_ms"}


def last_json(stdout: str) -> dict:
    return orjson.loads(stdout.strip().splitlines()[-1])


def test_loadgen_fills_the_queue_with_the_requested_mix(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, KEY)
    out = run_cli("loadgen", "--count", "300", "--invalid-ratio", "0.1", "--duplicate-ratio", "0.2", "--seed", "7",
                  "--rate", "2000", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = last_json(out.stdout)
    assert summary["sent"] == 300 and summary["failed"] == 0
    assert summary["valid"] + summary["invalid"] + summary["duplicates"] == 300
    assert summary["invalid"] > 0 and summary["duplicates"] > 0
    assert {"elapsed_s", "rate_per_s", "target_rate_per_s", "seed", "queue_url"} <= summary.keys()
    assert queue_counts(queues.client, queues.queue_url) == (300, 0)

    bodies = [m["Body"] for m in drain(queues.client, queues.queue_url)]
    assert len(bodies) == 300
    logins = [b for b in bodies if b.startswith('{"user_id"') and '"device_id":"' in b]
    assert len(logins) - len(set(logins)) >= summary["duplicates"]  # the same event, sent again verbatim


def test_loadgen_is_deterministic_for_a_seed() -> None:
    from pipeline.sample import iter_bodies, sample_bodies

    a = list(iter_bodies(500, 3, invalid_ratio=0.1, duplicate_ratio=0.1))
    assert a == list(iter_bodies(500, 3, invalid_ratio=0.1, duplicate_ratio=0.1))
    kinds = {k for k, _ in a}
    assert kinds == {"valid", "invalid", "duplicate"}
    assert sample_bodies(50, 1) == [b for _, b in iter_bodies(50, 1)]


def test_loadgen_without_a_queue_is_one_error_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PIPELINE_PIPELINE__STATE_DIR"] = str(tmp_path)
    out = run_cli("loadgen", "--count", "10", env=env)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "PIPELINE_SQS__QUEUE_URL" in errors[0] and "bench" in errors[0]


@pytest.mark.slow
def test_bench_writes_a_well_formed_report_and_cleans_up(queues, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, KEY)
    # Through the latency proxy, with a two-point search for the bare loop's best concurrency.
    out = run_cli("bench", "--count", "300", "--rounds", "2", "--out", str(tmp_path), "--latency-seconds", "2",
                  "--rtt-ms", "10", "--ceiling", "4,8", env=env, timeout=420)
    assert out.returncode == 0, out.stderr[-3000:]

    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("| phase") and any("(a) bare receive+delete" in line for line in lines)
    result = last_json(out.stdout)
    for ratio in ("pipeline_vs_broker", "core_vs_raw_copy"):
        assert isinstance(result["ratios"][ratio], float)
    assert set(result["met"]) == {"pipeline_vs_broker", "core_vs_raw_copy", "latency_p99_ms",  # CPU: loopback only
                                  "batched_vs_pipeline", "batched_vs_raw_copy"}
    assert isinstance(result["ratios"]["batched_vs_pipeline"], float)
    assert isinstance(result["ratios"]["cpu_vs_broker"], float)
    assert len(result["ratios"]["pipeline_vs_broker_by_round"]) == 2

    report = orjson.loads((tmp_path / "bench-rtt10ms.json").read_bytes())
    assert Path(result["files"]["json"]) == tmp_path / "bench-rtt10ms.json"
    assert (tmp_path / "bench-rtt10ms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["config"]["rtt_ms"] == 10 and [r["pollers"] for r in report["ceiling_search"]] == [4, 8]
    assert report["config"]["ceiling_pollers"] in (4, 8)
    assert report["series"]["pipeline"]["concurrency"]  # the adaptive limits over time, for the chart
    assert set(report["phases"]) == {"broker", "pipeline", "core", "raw_copy", "raw_direct_copy", "latency", "batched"}
    assert report["phases"]["batched"]["messages"] == 3000  # (d) counts events: 30 messages of 100
    for name, phase in report["phases"].items():
        assert PHASE_KEYS <= phase.keys(), name
        assert phase["messages"] > 0 and phase["rate_per_s"] > 0, name
    assert report["phases"]["broker"]["messages"] == report["phases"]["pipeline"]["messages"] == 300
    assert report["phases"]["core"]["messages"] == 300
    # the ceilings run at least 50 batches of the same rows under fresh ids: a rate from few commits runs high
    assert report["phases"]["raw_copy"]["messages"] == report["phases"]["raw_direct_copy"]["messages"] >= 300
    for phase in ("pipeline", "latency"):
        assert {"p50", "p95", "p99"} <= report["phases"][phase]["latency_ms"].keys()
    assert report["phases"]["latency"]["target_rate_per_s"] > 0
    assert {"cpus", "mem_gib", "python", "broker", "postgres"} <= report["machine"].keys()
    assert report["series"]["pipeline"]["throughput"]
    assert len(report["rounds"]["broker"]) == len(report["rounds"]["pipeline"]) == 2

    # Its queues and tables are gone; the configured ones were never touched.
    names = [u.rsplit("/", 1)[-1] for u in queues.client.list_queues().get("QueueUrls", [])]
    assert not [n for n in names if n.startswith("bench-")]
    assert not fetch(pg_dsn, "SELECT tablename FROM pg_tables WHERE tablename LIKE 'bench_%'")
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)


@pytest.mark.slow
def test_bench_memory_mode_reports_rss(queues, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, KEY)
    out = run_cli("bench", "--memory", "--count", "300", "--out", str(tmp_path), env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    memory = last_json(out.stdout)["ratios"]["memory"]
    assert {"rss_mb_at_10pct", "rss_mb_peak_after_10pct", "rss_mb_end", "growth_mb", "messages"} <= memory.keys()
    assert memory["messages"] == 300
    assert (tmp_path / "memory.json").exists() and (tmp_path / "memory.png").exists()


def test_processes_share_the_queue_and_sum_their_summaries(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_PIPELINE__PROCESSES="2")
    sent = run_cli("loadgen", "--count", "400", "--invalid-ratio", "0.05", "--seed", "11", env=env)
    assert sent.returncode == 0, sent.stderr[-2000:]
    invalid = last_json(sent.stdout)["invalid"]

    out = run_cli("run", "--until-empty", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = last_json(out.stdout)
    assert summary["processes"] == 2
    assert (summary["inserted"], summary["rejected"], summary["acked"]) == (400 - invalid, invalid, 400)
    assert fetch(pg_dsn, "SELECT count(*) AS n FROM user_logins")[0]["n"] == 400 - invalid
    workers = {orjson.loads(line).get("worker") for line in out.stderr.splitlines() if line.startswith("{")}
    assert {0, 1} <= workers  # each worker's log lines say which one it is
    assert queue_counts(queues.client, queues.queue_url) == (0, 0)


def test_processes_forward_sigterm_and_drain(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_PIPELINE__PROCESSES="2")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180  # two spawned workers, a loadgen and 200 rows, on a loaded machine
        assert proc.stderr is not None
        started = 0
        while started < 2 and time.monotonic() < deadline:  # both workers polling
            line = proc.stderr.readline()
            started += '"pipeline started"' in line
        assert started == 2
        sent = run_cli("loadgen", "--count", "200", env=env)
        assert sent.returncode == 0, sent.stderr[-2000:]
        while fetch(pg_dsn, "SELECT count(*) AS n FROM user_logins")[0]["n"] < 200:
            assert time.monotonic() < deadline, "200 rows did not arrive in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    summary = last_json(stdout)
    assert summary["processes"] == 2 and summary["inserted"] == 200 and summary["acked"] == 200
