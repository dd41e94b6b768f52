"""SQS mechanics shared by every stage and command: error classification, batching, FIFO rules.

One classifier decides whether an SQS failure can pass on a retry (``Transient``) or never
will (``Permanent``), by error code. Everything that calls SQS asks it, instead of each call
site keeping its own list: a permanent refusal retried in a loop is how one bad dead letter
used to stall every delete behind it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, ParamValidationError
from botocore.exceptions import ConnectionError as BotoConnectionError

__all__ = [
    "Fault", "classify", "classify_entry", "unanswered", "error_code", "describe", "RETRYABLE", "PERMANENT_CODES",
    "TRANSIENT_CODES", "chunks", "send_batches", "is_fifo", "derived_dlq_url", "queue_name",
    "SEND_BATCH_BYTES", "MAX_BATCH",
]

T = TypeVar("T")

MAX_BATCH = 10  # entries per SendMessageBatch / DeleteMessageBatch / ChangeMessageVisibilityBatch
SEND_BATCH_BYTES = 200_000  # per SendMessageBatch: well under any server's request cap (256 KiB on older ones)

# Exceptions an SQS call can raise at all; ``classify`` says which of them are worth retrying.
RETRYABLE = (BotoCoreError, ClientError, OSError, asyncio.TimeoutError)


class Fault(enum.Enum):
    """Whether a failed SQS call (or batch entry) can succeed when tried again."""

    TRANSIENT = "transient"  # throttling, server errors, the network: retry with backoff
    PERMANENT = "permanent"  # the request itself is refused: size, parameters, the queue is gone


# Codes whose request no retry can fix. Both spellings appear: AWS's query-compatible codes
# (``AWS.SimpleQueueService.*``) and the short ones that LocalStack and the JSON protocol use.
PERMANENT_CODES = frozenset({
    "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue",
    "AWS.SimpleQueueService.QueueDeletedRecently", "QueueDeletedRecently",
    "InvalidParameterValue", "InvalidParameterCombination", "MissingParameter", "ValidationError",
    "InvalidAttributeName", "InvalidAttributeValue", "InvalidMessageContents", "MessageTooLong",
    "AWS.SimpleQueueService.BatchRequestTooLong", "BatchRequestTooLong",
    "AWS.SimpleQueueService.TooManyEntriesInBatchRequest", "TooManyEntriesInBatchRequest",
    "AWS.SimpleQueueService.BatchEntryIdsNotDistinct", "BatchEntryIdsNotDistinct",
    "AWS.SimpleQueueService.EmptyBatchRequest", "EmptyBatchRequest",
    "AWS.SimpleQueueService.InvalidBatchEntryId", "InvalidBatchEntryId",
    "AWS.SimpleQueueService.UnsupportedOperation", "UnsupportedOperation",
    "ReceiptHandleIsInvalid", "InvalidIdFormat", "AWS.SimpleQueueService.MessageNotInflight",
    "MessageNotInflight", "AccessDenied", "AccessDeniedException", "InvalidAddress", "InvalidSecurity",
    "KmsAccessDenied", "KmsDisabled", "KmsInvalidState", "KmsInvalidKeyUsage", "KmsNotFound", "KmsOptInRequired",
    "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch",
})
# Codes known to pass with time. Unknown codes are treated as transient too, but callers bound
# their attempts, so an unknown permanent code costs a few retries, never a stalled slot.
TRANSIENT_CODES = frozenset({
    "ThrottlingException", "RequestThrottled", "AWS.SimpleQueueService.RequestThrottled", "Throttling",
    "ServiceUnavailable", "InternalError", "InternalFailure", "KmsThrottled", "OverLimit", "SlowDown",
    "RequestTimeout", "RequestTimeoutException", "ExpiredToken", "ExpiredTokenException",
})


def error_code(exc: BaseException) -> str:
    """The SQS error code of a failed call, or the exception's type name."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "ClientError")
    return type(exc).__name__


def classify(exc: BaseException) -> Fault:
    """Transient or permanent, for an exception raised by an SQS call."""
    if isinstance(exc, ParamValidationError):  # refused before it was sent
        return Fault.PERMANENT
    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code in PERMANENT_CODES:
            return Fault.PERMANENT
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code not in TRANSIENT_CODES and 400 <= status < 500 and status not in (408, 429):
            return Fault.PERMANENT  # an unlisted sender fault
    return Fault.TRANSIENT  # the network, timeouts, throttling, 5xx


def unanswered(exc: BaseException) -> bool:
    """Whether a failed call got no response at all (the network, a timeout): the endpoint, not the request.

    A response of any kind, even a refusal, proves SQS reachable; a ``ParamValidationError`` was
    never sent, and missing credentials are not the endpoint's fault. ``stages.outage`` holds
    every caller back on these, and only on these.
    """
    return isinstance(exc, (HTTPClientError, BotoConnectionError, OSError))


def classify_entry(failed: dict[str, Any]) -> Fault:
    """Transient or permanent, for one ``Failed`` entry of a batch call's response."""
    if failed.get("Code") in TRANSIENT_CODES:
        return Fault.TRANSIENT
    if failed.get("SenderFault") or failed.get("Code") in PERMANENT_CODES:
        return Fault.PERMANENT
    return Fault.TRANSIENT


def describe(exc: BaseException | None) -> str:
    """``Code: message`` of a failed call, for logs (SQS messages never quote bodies)."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'ClientError')}: {err.get('Message', '')}"
    return f"{type(exc).__name__}: {exc}"


def chunks(items: Iterable[T], size: int = MAX_BATCH) -> Iterator[list[T]]:
    """Consecutive lists of at most ``size``: SQS batch calls take 10 entries.

    Lazy, so chunking a generator (``loadgen``'s millions of bodies) never holds it all.
    """
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def send_batches(items: list[T], body: Callable[[T], str], overhead: int = 1024,
                 max_bytes: int = SEND_BATCH_BYTES) -> list[list[T]]:
    """Split ``items`` into ``SendMessageBatch`` calls: at most 10 entries and ``max_bytes`` each.

    ``body(item)`` is the message body; ``overhead`` covers its attributes. A body near the
    message limit travels alone, so that a refusal of it refuses nothing else.
    """
    out: list[list[T]] = []
    size = 0
    for item in items:
        n = len(body(item).encode()) + overhead
        if not out or len(out[-1]) == MAX_BATCH or size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


def is_fifo(queue_url: str) -> bool:
    """FIFO queue names end in ``.fifo``; SQS enforces it, so the URL tells."""
    return queue_url.rstrip("/").endswith(".fifo")


def queue_name(queue_url: str) -> str:
    return queue_url.rstrip("/").rsplit("/", 1)[-1]


def derived_dlq_url(queue_url: str) -> str:
    """``<queue>-dlq`` next to the source, ``<queue>-dlq.fifo`` for a FIFO source (a DLQ has its type)."""
    url = queue_url.rstrip("/")
    if is_fifo(url):
        return url.removesuffix(".fifo") + "-dlq.fifo"
    return url + "-dlq"
