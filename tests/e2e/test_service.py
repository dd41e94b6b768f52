"""Service mode: the HTTP endpoint (/healthz, /readyz, /metrics), metrics that match the table,
readiness that follows PostgreSQL, and a clean SIGTERM, against LocalStack and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.runner import Runtime, run
from pipeline.sample import MALFORMED, WRONG_TYPE, sample_bodies
from stages.masking import generate_key
from tests.helpers import REPO, fetch, make_settings, pipeline_env, queue_counts, send_bodies

KEY = generate_key("svc").encode()
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never a proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def wait_status(url: str, status: int, timeout: float, proc: subprocess.Popen | None = None) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        code, body = get(url)
        if code == status:
            return body
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"pipeline exited with {proc.returncode} while waiting for {url}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} answered {code} {body[:300]!r}, not {status}, for {timeout:g} s")
        time.sleep(0.2)


def scrape(base: str) -> tuple[dict[str, float], str]:
    """``{sample name{labels}: value}`` and the raw text of /metrics."""
    code, body = get(base + "/metrics")
    assert code == 200
    text = body.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out, text


def wait_metric(base: str, name: str, value: float, timeout: float, proc: subprocess.Popen) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics, _ = scrape(base)
        if metrics.get(name) == value:
            return metrics
        assert proc.poll() is None, f"pipeline exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{name} is {metrics.get(name)}, not {value}, after {timeout:g} s"
        time.sleep(0.3)


def pii_of(bodies: list[str]) -> set[str]:
    values = set()
    for b in bodies:
        try:
            event = orjson.loads(b)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            values |= {str(event[k]) for k in ("ip", "device_id") if k in event}
    return values


def assert_no_pii(text: str, values: set[str]) -> None:
    leaked = [v for v in values if re.search(rf"(?<![\w.:-]){re.escape(v)}(?![\w.:-])", text)]
    assert not leaked, f"raw PII in /metrics: {leaked[:3]}"


@pytest.mark.slow
def test_service_mode_health_metrics_and_sigterm(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = pipeline_env(queues, pg_dsn, KEY, PIPELINE_HTTP__PORT=str(port), PIPELINE_HTTP__HOST="127.0.0.1",
                       PIPELINE_PIPELINE__PROGRESS_INTERVAL="2")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run"], cwd=REPO, env=env, stdout=out, stderr=err)
        try:
            assert orjson.loads(wait_status(base + "/healthz", 200, 60, proc)) == {"status": "ok"}
            assert orjson.loads(wait_status(base + "/readyz", 200, 60, proc)) == {"ready": True}

            good = sample_bodies(2000, seed=5)
            bad = [WRONG_TYPE, *MALFORMED]
            send_bodies(queues.client, queues.queue_url, good + bad)
            metrics = wait_metric(base, "pipeline_rows_inserted_total", 2000, 180, proc)
            metrics = wait_metric(base, "pipeline_messages_acked_total", 2000 + len(bad), 60, proc)

            # Counters match the rows actually written.
            assert fetch(pg_dsn, "SELECT count(*) AS n FROM user_logins")[0]["n"] == 2000
            assert metrics["pipeline_messages_received_total"] == 2000 + len(bad)
            assert metrics["pipeline_duplicates_total"] == 0
            assert sum(v for k, v in metrics.items() if k.startswith("pipeline_messages_rejected_total")) == len(bad)
            assert metrics["pipeline_messages_rejected_total{rule=ip.invalid}"] == 1
            assert metrics["pipeline_batch_size_sum"] == 2000  # every committed message, in batches
            assert metrics["pipeline_end_to_end_latency_seconds_count"] == 2000
            assert metrics["pipeline_end_to_end_latency_seconds_bucket{le=+Inf}"] == 2000
            assert metrics["pipeline_messages_in_flight"] == 0
            assert {"pipeline_errors_total{dependency=sqs}", "pipeline_errors_total{dependency=postgres}"} <= set(metrics)
            assert {"pipeline_stage_queue_depth{queue=raw}", "pipeline_stage_queue_depth{queue=rows}",
                    "pipeline_stage_queue_depth{queue=acks}"} <= set(metrics)
            _, text = scrape(base)
            assert_no_pii(text, pii_of(good + bad) | {"300.1.2.3", "111-22-3333", "12345"})
            assert queue_counts(queues.client, queues.queue_url) == (0, 0)

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        summary = orjson.loads(out.read().decode().strip().splitlines()[-1])
        logs = err.read().decode().splitlines()
    assert summary["inserted"] == 2000 and summary["rejected"] == len(bad)
    # Not a terminal: no progress bar, only JSON log lines (one of them a progress line).
    entries = [orjson.loads(line) for line in logs]
    assert any(e["msg"] == "progress" for e in entries)
    assert any(e["msg"] == "http endpoint listening" for e in entries)


async def _get(url: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(get, url)


async def _wait_ready(base: str, want: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, body = await _get(base + "/readyz")
        if code == want:
            return orjson.loads(body)
        assert time.monotonic() < deadline, f"/readyz stayed {code} {body[:300]!r}"
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_readyz_follows_postgres_and_draining(queues, postgres, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """In-process: /readyz says 503 naming postgres while it is down, 200 once it is back."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = make_settings(queues, pg_dsn, KEY)
    settings = settings.model_copy(update={"http": settings.http.model_copy(update={"port": port, "host": "127.0.0.1"})})
    stop = asyncio.Event()
    rt = Runtime(settings)
    task = asyncio.create_task(run(settings, stop=stop, runtime=rt))
    try:
        await _wait_ready(base, 200, 60)
        await asyncio.to_thread(postgres.stop)
        try:
            body = await _wait_ready(base, 503, 30)
            assert "postgres" in body["not_ready"] and body["ready"] is False
            assert (await _get(base + "/healthz"))[0] == 200  # alive, just not ready
        finally:
            await asyncio.to_thread(postgres.start)
        await _wait_ready(base, 200, 60)
        stop.set()
        summary = await asyncio.wait_for(task, 30)
        assert summary["inserted"] == 0
    finally:
        stop.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert (await _get(base + "/healthz"))[0] == 0  # the endpoint stops with the pipeline


async def test_two_pipelines_in_one_process_have_their_own_metrics(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """Per-runtime registries: one pipeline's counters never show up in another's /metrics."""
    settings = make_settings(queues, pg_dsn, KEY)
    send_bodies(queues.client, queues.queue_url, sample_bodies(30, seed=9))
    ports = [free_port(), free_port()]
    rts = [Runtime(settings.model_copy(update={"http": settings.http.model_copy(update={"port": p, "host": "127.0.0.1"})}))
           for p in ports]
    drained = await run(rts[0].settings, until_empty=True, runtime=rts[0])
    assert drained["inserted"] == 30
    stop = asyncio.Event()
    task = asyncio.create_task(run(rts[1].settings, stop=stop, runtime=rts[1]))
    try:
        await _wait_ready(f"http://127.0.0.1:{ports[1]}", 200, 60)
        code, body = await _get(f"http://127.0.0.1:{ports[1]}/metrics")
        assert code == 200 and b"\npipeline_rows_inserted_total 0.0\n" in body
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_until_empty_on_a_terminal_shows_a_bar_and_a_summary_table(queues, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """stderr on a pty: live bar + table there; stdout still carries exactly the JSON summary."""
    import os
    import pty
    import select

    send_bodies(queues.client, queues.queue_url, sample_bodies(50, seed=3) + [WRONG_TYPE])
    env = pipeline_env(queues, pg_dsn, KEY, TERM="xterm", COLUMNS="120")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--until-empty"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    screen = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        stdout = proc.communicate(timeout=120)[0].decode()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, screen.decode(errors="replace")[-2000:]
    summary = orjson.loads(stdout)  # the only thing on stdout
    assert (summary["inserted"], summary["rejected"]) == (50, 1)
    text = screen.decode(errors="replace")
    assert "draining" in text and "run summary" in text and "inserted (rows written)" in text
    assert "body.not_login_event" in text
    assert '"msg":"progress"' not in text  # INFO logs give way to the bar
