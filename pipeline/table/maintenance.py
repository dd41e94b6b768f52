"""The table maintenance that ``run`` does on its own, every ``postgres.maintenance_interval``.

Months are created ahead (``postgres.partitions_ahead``) so that rows never pile up in
``DEFAULT``, and, when ``postgres.retention_days`` is set, retention is applied. Every instance
runs this; they cannot collide: partition DDL is ``migrate`` (under ``MIGRATION_LOCK``) and
retention runs in one instance at a time (``RETENTION_LOCK``, the others skip). Locks are taken
with a timeout, so a long transaction makes maintenance wait for the next round, never the
sink. A failure is logged and retried next round: it must not stop the pipeline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from ..settings import Settings

__all__ = ["maintain", "maintenance_loop", "LOCK_TIMEOUT"]

log = logging.getLogger("pipeline.maintenance")

LOCK_TIMEOUT = 5.0  # seconds: longer than any DDL here takes, short enough not to stall writers queued behind it


async def maintain(settings: Settings, *, today: dt.date | None = None) -> dict[str, Any]:
    """One round: partitions ahead, then retention if configured; return what was done."""
    from ..clients import connect_postgres
    from ..schema import migrate
    from .partitions import Layout
    from .retention import retention

    pg = settings.postgres
    conn = await connect_postgres(settings)
    try:
        done: dict[str, Any] = {"changes": await migrate(conn, pg.table, Layout.of(settings, today),
                                                         lock_timeout=LOCK_TIMEOUT)}
        if pg.retention_days:
            try:
                done["retention"] = await retention(conn, pg.table, pg.retention_days, today=today,
                                                    lock_timeout=LOCK_TIMEOUT)
            except RuntimeError:  # another instance is applying it right now
                done["retention"] = None
    finally:
        await conn.close()
    return done


async def maintenance_loop(settings: Settings) -> None:
    """Every ``maintenance_interval`` seconds (first round at once); never raises but on cancel."""
    from ..audit import write_audit
    from ..errors import describe

    while True:
        try:
            done = await maintain(settings)
            if done["changes"]:
                log.info("table maintenance", extra={"table": settings.postgres.table, "statements": len(done["changes"])})
            report = done.get("retention")
            if report and (report["partitions_dropped"] or report["rows_deleted_total"]):
                write_audit(settings, "retention", refusal="the rows are removed but unaudited", periodic=True,
                            **{k: report[k] for k in ("table", "keep_days", "cutoff", "partitions_dropped",
                                                      "rows_deleted_total")})
        except Exception as exc:  # noqa: BLE001 - logged; the next round tries again
            log.warning("table maintenance failed, retrying next round", extra={"error": describe(exc, settings)})
        await asyncio.sleep(settings.postgres.maintenance_interval)
