"""The one classifier of PostgreSQL failures, as the sink sees them.

Every error of a COPY batch lands in one of four classes, and each class has one treatment:

- ``ROW``: the row's data breaks the table (SQLSTATE classes 22 data, 23 integrity). Bisect
  the batch down to the row and dead-letter it with the database's reason.
- ``SUSPECT``: probably caused by one row, but maybe not for good (a trigger or routine
  raising, cardinality, program limits; or a value the driver could not encode). Bisect, then
  leave that row for redelivery; if it keeps failing it becomes poison.
- ``TRANSIENT``: the connection, the server or the table are in trouble, not the rows. Retry
  the whole batch with backoff; meanwhile the queues fill and the source stops polling.
- ``FATAL``: not a database failure at all (a bug): let it crash the stage.
"""

from __future__ import annotations

import asyncio
import enum

import asyncpg

__all__ = ["PgFault", "classify", "sqlstate", "unanswered"]


class PgFault(enum.Enum):
    ROW = "row"
    SUSPECT = "suspect"
    TRANSIENT = "transient"
    FATAL = "fatal"


_ROW_CLASSES = frozenset(("22", "23"))
# Raised because of what is in a row, but not necessarily for good: triggers and routines
# raising (P0, 2F, 38, 39, 09, 27), cardinality, check option, program limits.
_SUSPECT_CLASSES = frozenset(("P0", "2F", "38", "39", "09", "27", "21", "44", "54"))
# A connection lost mid-COPY can surface as InternalClientError ("waiter is not done while
# handling critical protocol error"): asyncpg aborts that connection, so a retry gets a new one.
_CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def classify(exc: BaseException) -> PgFault:
    if isinstance(exc, asyncpg.PostgresError):
        cls = sqlstate(exc)[:2]
        if cls in _ROW_CLASSES:
            return PgFault.ROW
        if cls in _SUSPECT_CLASSES:
            return PgFault.SUSPECT
        return PgFault.TRANSIENT  # connection exceptions, shutdown, a missing table, locks, ...
    if isinstance(exc, _CONNECTION_ERRORS):
        return PgFault.TRANSIENT
    if isinstance(exc, (ValueError, TypeError)):  # the driver could not encode a value (e.g. a lone surrogate)
        return PgFault.SUSPECT
    return PgFault.FATAL


# The server is going away or not there yet: admin/crash shutdown, starting up.
_SERVER_GONE = frozenset(("57P01", "57P02", "57P03"))


def unanswered(exc: BaseException) -> bool:
    """Whether the server, not the statement, failed: no connection, a lost one, shutdown, start-up.

    ``stages.outage`` holds every writer back on these, and only on these: a statement the
    server answered with an error (a lock, a deadlock, a missing table) proves it reachable.
    """
    if isinstance(exc, asyncpg.PostgresError):
        code = sqlstate(exc)
        return code[:2] == "08" or code in _SERVER_GONE
    if isinstance(exc, TimeoutError):  # a statement past command_timeout, a busy pool: slow, not gone
        return False
    return isinstance(exc, _CONNECTION_ERRORS)
