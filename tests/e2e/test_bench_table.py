"""``bench --table`` on a few thousand rows: the report is well formed and its tables are gone after (never timings)."""

from __future__ import annotations

from pathlib import Path

import orjson

from stages.masking import generate_key
from tests.helpers import fetch, pipeline_env, run_cli


def test_bench_table_reports_every_variant_and_cleans_up(queues, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = pipeline_env(queues, pg_dsn, generate_key("bt").encode())
    p = run_cli("bench", "--table", "--table-rows", "3000", "--month-rows", "2000", "--table-batches", "2",
                "--out", str(tmp_path), env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    line = orjson.loads(p.stdout.splitlines()[-1])
    report = orjson.loads(Path(line["files"]["json"]).read_bytes())
    assert set(report["ingest"]) == {"partitioned@0", "partitioned@3000", "partitioned_month_full@3000",
                                     "partitioned_month_full_no_indexes@3000", "partitioned_no_indexes@0",
                                     "unpartitioned@0", "unpartitioned@3000"}
    assert all(r["rows"] == 2 * 2000 and r["rows_per_s"] > 0 for r in report["ingest"].values())
    # Steady state measured after a warm-up round; the warm-up (right after a checkpoint) reported too.
    assert all(r["after_checkpoint"]["rows_per_s"] > 0 and r["after_checkpoint"]["wal_bytes_per_row"] >= 0
               for r in report["ingest"].values())
    assert "partitioned_month_full_vs_empty_after_checkpoint" in line["ratios"]
    assert "ingest_month_end_ge_0.9_empty" in line["met"]
    assert report["retention"]["rows_deleted"] == 2000 and report["retention"]["partitions_dropped"]
    assert set(line["ratios"]) >= {"partitioned_full_vs_empty", "indexes_cost_empty"} and set(line["met"])
    assert fetch(pg_dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE 'bench_tbl%'")[0][0] == 0
