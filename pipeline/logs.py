"""JSON-lines logging to stderr, rendered with orjson.

Stages log reasons, rules, counts and message ids, never bodies or field values, so no raw
ip or device_id can reach a log line.

The level is ``--log-level``, or by default WARNING for commands whose output is the point
(``show``, ``unmask``, ``check``, ``keygen``: INFO lines would bury it on a terminal) and INFO
for the rest. The format stays JSON everywhere, a terminal included, so one parser reads every
line; a live progress bar prints them through a console that never breaks a line itself.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

__all__ = ["setup_logging"]

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "aiobotocore", "asyncio", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Audit records are not chatter: they are written whatever the level (`unmask` defaults to WARNING).
    logging.getLogger("pipeline.audit").setLevel(logging.INFO)
