"""One classifier per dependency, table-driven: SQS (permanent vs transient) and PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from botocore.exceptions import (
    ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, ParamValidationError,
    ReadTimeoutError,
)

from stages.pgerrors import PgFault
from stages.pgerrors import classify as pg_classify
from stages.pgerrors import unanswered as pg_unanswered
from stages.sqs import Fault, classify, classify_entry, unanswered
from tests.sqs_fake import client_error, failed_entry

SQS_CASES = [
    (client_error("AWS.SimpleQueueService.NonExistentQueue"), Fault.PERMANENT),
    (client_error("QueueDoesNotExist"), Fault.PERMANENT),
    (client_error("InvalidParameterValue"), Fault.PERMANENT),
    (client_error("AWS.SimpleQueueService.BatchRequestTooLong"), Fault.PERMANENT),
    (client_error("InvalidMessageContents"), Fault.PERMANENT),
    (client_error("MissingParameter"), Fault.PERMANENT),  # e.g. a FIFO send without MessageGroupId
    (client_error("AccessDenied", status=403), Fault.PERMANENT),
    (client_error("SomethingNew", status=400), Fault.PERMANENT),  # an unlisted sender fault
    (client_error("ThrottlingException", status=400), Fault.TRANSIENT),
    (client_error("RequestThrottled", status=403), Fault.TRANSIENT),
    (client_error("ServiceUnavailable", status=503), Fault.TRANSIENT),
    (client_error("InternalError", status=500), Fault.TRANSIENT),
    (client_error("SomethingNew", status=500), Fault.TRANSIENT),
    (client_error("Whatever", status=429), Fault.TRANSIENT),
    (ParamValidationError(report="bad"), Fault.PERMANENT),
    (EndpointConnectionError(endpoint_url="http://x"), Fault.TRANSIENT),
    (ReadTimeoutError(endpoint_url="http://x"), Fault.TRANSIENT),
    (OSError("reset"), Fault.TRANSIENT),
    (asyncio.TimeoutError(), Fault.TRANSIENT),
]


@pytest.mark.parametrize(("exc", "fault"), SQS_CASES, ids=lambda v: getattr(v, "name", type(v).__name__))
def test_sqs_classify(exc: BaseException, fault: Fault) -> None:
    assert classify(exc) is fault


# Whether SQS answered at all: only a call without any response holds every caller back (stages.outage).
UNANSWERED_CASES = [
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (ReadTimeoutError(endpoint_url="http://x"), True),
    (ConnectionClosedError(endpoint_url="http://x"), True),
    (OSError("reset"), True),
    (asyncio.TimeoutError(), True),
    (client_error("ServiceUnavailable", status=503), False),  # a response: the server is there
    (client_error("ThrottlingException", status=400), False),
    (client_error("QueueDoesNotExist"), False),
    (ParamValidationError(report="bad"), False),  # never sent
    (NoCredentialsError(), False),  # not the endpoint's fault
    (ConnectTimeoutError(endpoint_url="http://x"), True),
]


@pytest.mark.parametrize(("exc", "expected"), UNANSWERED_CASES, ids=lambda v: getattr(v, "name", type(v).__name__))
def test_sqs_unanswered(exc: BaseException, expected: bool) -> None:
    assert unanswered(exc) is expected


@pytest.mark.parametrize(("entry", "fault"), [
    (failed_entry("0", "ReceiptHandleIsInvalid", True), Fault.PERMANENT),
    (failed_entry("0", "InvalidParameterValue", True), Fault.PERMANENT),
    (failed_entry("0", "InvalidParameterValue", False), Fault.PERMANENT),
    (failed_entry("0", "SomethingNew", True), Fault.PERMANENT),
    (failed_entry("0", "InternalError", False), Fault.TRANSIENT),
    (failed_entry("0", "ThrottlingException", True), Fault.TRANSIENT),
    (failed_entry("0", "SomethingNew", False), Fault.TRANSIENT),
])
def test_sqs_classify_entry(entry: dict, fault: Fault) -> None:
    assert classify_entry(entry) is fault


def _pg(cls: type[asyncpg.PostgresError]) -> asyncpg.PostgresError:
    return cls("canned")


PG_CASES = [
    (_pg(asyncpg.StringDataRightTruncationError), PgFault.ROW),  # 22001
    (_pg(asyncpg.NotNullViolationError), PgFault.ROW),  # 23502
    (_pg(asyncpg.UniqueViolationError), PgFault.ROW),  # 23505
    (_pg(asyncpg.CheckViolationError), PgFault.ROW),  # 23514
    (_pg(asyncpg.RaiseError), PgFault.SUSPECT),  # P0001: a trigger raising
    (_pg(asyncpg.CardinalityViolationError), PgFault.SUSPECT),  # 21000
    (_pg(asyncpg.ProgramLimitExceededError), PgFault.SUSPECT),  # 54000
    (_pg(asyncpg.AdminShutdownError), PgFault.TRANSIENT),  # 57P01
    (_pg(asyncpg.CannotConnectNowError), PgFault.TRANSIENT),  # 57P03
    (_pg(asyncpg.UndefinedTableError), PgFault.TRANSIENT),  # 42P01: the table is being recreated
    (_pg(asyncpg.DeadlockDetectedError), PgFault.TRANSIENT),  # 40P01
    (asyncpg.InterfaceError("connection is closed"), PgFault.TRANSIENT),
    (asyncpg.InternalClientError("waiter is not done"), PgFault.TRANSIENT),
    (ConnectionResetError(), PgFault.TRANSIENT),
    (asyncio.TimeoutError(), PgFault.TRANSIENT),
    (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate"), PgFault.SUSPECT),
    (TypeError("bad value"), PgFault.SUSPECT),
    (KeyError("bug"), PgFault.FATAL),
    (AttributeError("bug"), PgFault.FATAL),
]


@pytest.mark.parametrize(("exc", "fault"), PG_CASES, ids=lambda v: getattr(v, "name", type(v).__name__))
def test_pg_classify(exc: BaseException, fault: PgFault) -> None:
    assert pg_classify(exc) is fault


# Whether the server, not the statement, failed: only these hold every writer back (stages.outage).
PG_UNANSWERED_CASES = [
    (ConnectionRefusedError(), True),  # the server is down
    (ConnectionResetError(), True),
    (asyncio.TimeoutError(), False),  # past command_timeout, or a busy pool: slow, not gone
    (asyncpg.InterfaceError("connection is closed"), True),
    (asyncpg.InternalClientError("waiter is not done"), True),
    (_pg(asyncpg.ConnectionDoesNotExistError), True),  # 08003
    (_pg(asyncpg.AdminShutdownError), True),  # 57P01
    (_pg(asyncpg.CannotConnectNowError), True),  # 57P03: starting up
    (_pg(asyncpg.DeadlockDetectedError), False),  # an answer: the server is there
    (_pg(asyncpg.UndefinedTableError), False),
    (_pg(asyncpg.LockNotAvailableError), False),
    (_pg(asyncpg.CheckViolationError), False),
    (TypeError("bad value"), False),
]


@pytest.mark.parametrize(("exc", "expected"), PG_UNANSWERED_CASES, ids=lambda v: getattr(v, "name", type(v).__name__))
def test_pg_unanswered(exc: BaseException, expected: bool) -> None:
    assert pg_unanswered(exc) is expected
