"""Internal events: each one bumps its counter and writes its log line, in one call.

Counters and logs written separately drift apart (a path that logs but forgets to count, or
the reverse); here they cannot. Log fields carry codes, rules, reasons and message ids, never
a body, an ip or a device id.
"""

from __future__ import annotations

import logging

from .sqs import Fault, describe, error_code
from .stats import Stats

__all__ = [
    "db_write_failed", "row_left_for_redelivery", "row_rejected_by_database", "sqs_call_failed", "dead_lettered", "dead_letter_refused", "dead_letters_given_up", "delete_failed_for_good",
    "concurrency_changed", "copy_met_stored_key", "transform_workers_failed", "dependency_unreachable",
    "dependency_reachable",
]

_sqs = logging.getLogger("pipeline.sqs")
_sink = logging.getLogger("pipeline.sink")
_acker = logging.getLogger("pipeline.acker")
_concurrency = logging.getLogger("pipeline.concurrency")
_transform = logging.getLogger("pipeline.transform")
_outage = logging.getLogger("pipeline.outage")


def sqs_call_failed(stats: Stats, op: str, exc: BaseException, fault: Fault, **extra: object) -> None:
    """A call to SQS failed; ``fault`` says whether it will be retried."""
    stats.errors["sqs"] += 1
    _sqs.warning("sqs call failed", extra={"op": op, "error": describe(exc), "fault": fault.value, **extra})


def dead_lettered(stats: Stats, rule: str, reason: str, message_id: str) -> None:
    stats.rejected += 1
    stats.rejected_by_rule[rule] += 1
    _acker.info("dead-lettered", extra={"rule": rule, "reason": reason, "message_id": message_id})


def dead_letter_refused(stats: Stats, code: str, rule: str, message_id: str, *, fifo: bool) -> None:
    """SQS refused a dead letter for good: it stays on the source queue and comes back after its timeout."""
    stats.dead_letters_refused[code] += 1
    extra = {"error_code": code, "rule": rule, "message_id": message_id}
    if fifo:
        extra["fifo"] = "later messages of its group may already be stored: order within the group is broken here"
    _acker.error("dead letter refused by SQS; the message stays on the source queue", extra=extra)


def dead_letters_given_up(stats: Stats, n: int, exc_or_code: BaseException | str) -> None:
    """Transient DLQ failures outlasted their attempts: the messages come back after their timeout."""
    stats.dead_letter_retries_exhausted += n
    code = exc_or_code if isinstance(exc_or_code, str) else error_code(exc_or_code)
    _acker.warning("dead letters not sent after retries; they return to the source queue",
                   extra={"messages": n, "error_code": code})


def delete_failed_for_good(stats: Stats, code: str) -> None:
    """A delete entry failed for good; the message comes back and the sink deduplicates it."""
    stats.ack_failures += 1
    _acker.warning("delete failed for good", extra={"error": code})



def concurrency_changed(stats: Stats, op: str, limit: int, reason: str) -> None:
    """An adaptive limit moved: the gauge follows; DEBUG only, since it moves several times a second while ramping."""
    stats.concurrency[op] = limit
    _concurrency.debug("concurrency changed", extra={"op": op, "limit": limit, "reason": reason})


def db_write_failed(stats: Stats, exc: BaseException, attempt: int, sleep_s: float | None) -> None:
    """A batch could not be written for a transient reason; it is retried whole after ``sleep_s``."""
    stats.errors["postgres"] += 1
    _sink.warning("database write failed, retrying", extra={
        "error": f"{type(exc).__name__}: {exc}", "attempt": attempt,
        "sleep_s": None if sleep_s is None else round(sleep_s, 2)})


def row_left_for_redelivery(stats: Stats, sqlstate: str, exc: BaseException, message_id: str) -> None:
    """One row failed for a reason that may pass; its message comes back (and becomes poison if it keeps failing)."""
    stats.errors["postgres"] += 1
    _sink.warning("row failed, leaving it for redelivery",
                  extra={"sqlstate": sqlstate, "error": type(exc).__name__, "message_id": message_id})


def row_rejected_by_database(sqlstate: str, message_id: str) -> None:
    """Counted as a dead letter once the DLQ takes it (``dead_lettered``)."""
    _sink.warning("database rejected a row", extra={"sqlstate": sqlstate, "message_id": message_id})


def copy_met_stored_key(stats: Stats) -> None:
    stats.copy_conflicts += 1
    _sink.debug("a direct COPY met a stored key; writing through the staged upsert for a while")


def transform_workers_failed(stats: Stats) -> None:
    stats.errors["transform_workers"] += 1
    _transform.error("a transform worker process died; this batch is transformed in the pipeline's own process "
                     "and a new worker pool starts with the next")


def dependency_unreachable(stats: Stats, dependency: str) -> None:
    """A call got no response at all: calls now wait for one probe per backoff step (``stages.outage``)."""
    stats.outages[dependency] += 1
    stats.unreachable.add(dependency)
    _outage.warning("dependency unreachable; one call per backoff step probes it, the others wait",
                    extra={"dependency": dependency})


def dependency_reachable(stats: Stats, dependency: str, down_s: float, failed_probes: int) -> None:
    stats.unreachable.discard(dependency)
    _outage.info("dependency reachable again", extra={
        "dependency": dependency, "down_s": round(down_s, 2), "failed_probes": failed_probes})
