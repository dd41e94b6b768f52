"""An in-memory stand-in for the aiobotocore SQS client, for service-free unit tests of branch logic.

In the style of aiokafka's fetcher tests: each operation answers from a script of canned
responses (a dict is returned, an exception raised, a callable called with the request) and,
once the script is used up, succeeds for every entry. Every call is recorded. Stage and e2e
tests still use LocalStack; this fake only drives the branches that a real server makes hard
to reach on demand (a refusal of entry 3 of 10, a throttle on the fourth call, ...).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from typing import Any

from botocore.exceptions import ClientError

__all__ = ["FakeSqs", "client_error", "failed_entry"]


def client_error(code: str, op: str = "SendMessageBatch", status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"canned {code}"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def failed_entry(entry_id: str, code: str, sender_fault: bool = False) -> dict:
    return {"Id": entry_id, "Code": code, "SenderFault": sender_fault, "Message": f"canned {code}"}


class FakeSqs:
    def __init__(self) -> None:
        self.calls: dict[str, list[dict]] = defaultdict(list)
        self.script: dict[str, deque] = defaultdict(deque)
        self.inbox: deque[list[dict]] = deque()  # receive batches to hand out, in order
        self.latency = 0.0

    def then(self, op: str, *answers: Any) -> FakeSqs:
        """Queue canned answers for ``op``: a dict (returned), an exception (raised), a callable(request)."""
        self.script[op].extend(answers)
        return self

    async def _answer(self, op: str, request: dict, default: Any) -> dict:
        self.calls[op].append(request)
        await asyncio.sleep(self.latency)  # a real call always yields to the loop, however fast
        if self.script[op]:
            answer = self.script[op].popleft()
            if isinstance(answer, BaseException):
                raise answer
            result = answer(request) if callable(answer) else answer
            return await result if asyncio.iscoroutine(result) else result
        result = default(request)
        return await result if asyncio.iscoroutine(result) else result

    @staticmethod
    def _all_ok(request: dict) -> dict:
        return {"Successful": [{"Id": e["Id"]} for e in request["Entries"]], "Failed": []}

    async def delete_message_batch(self, **request: Any) -> dict:
        return await self._answer("delete", request, self._all_ok)

    async def send_message_batch(self, **request: Any) -> dict:
        def ok(req: dict) -> dict:
            return {"Successful": [{"Id": e["Id"], "MessageId": f"dl-{e['Id']}"} for e in req["Entries"]], "Failed": []}
        return await self._answer("send", request, ok)

    async def change_message_visibility_batch(self, **request: Any) -> dict:
        return await self._answer("visibility", request, self._all_ok)

    async def receive_message(self, **request: Any) -> dict:
        async def from_inbox(req: dict) -> dict:
            if not self.inbox:
                await asyncio.sleep(0.01)  # an empty long poll takes a while
                return {}
            return {"Messages": self.inbox.popleft()}
        return await self._answer("receive", request, from_inbox)

    async def get_queue_attributes(self, **request: Any) -> dict:
        return await self._answer("attributes", request, lambda req: {"Attributes": {}})

    def handles(self, op: str) -> list[str]:
        """Receipt handles of every entry ``op`` was called with, in order."""
        return [e["ReceiptHandle"] for call in self.calls[op] for e in call["Entries"]]


def message(i: int, body: str = "{}", group: str | None = None) -> dict:
    attrs = {"SentTimestamp": "1764201600000", "ApproximateReceiveCount": "1"}
    if group is not None:
        attrs["MessageGroupId"] = group
    return {"MessageId": f"m-{i}", "ReceiptHandle": f"h-{i}", "Body": body, "Attributes": attrs}
