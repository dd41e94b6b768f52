"""One audit trail for the operations on people's data: unmask, retention, erase.

A record is one JSON object: what was done, when, by whom, from where, and counts. It goes to
the ``pipeline.audit`` logger and, when ``masking.audit_log`` is set, is appended to that file
and fsynced before the caller goes on, so an operation whose record cannot be written is
refused (``AuditError``) rather than done unrecorded. Callers put no raw PII in it: counts,
key ids, SHA-256 fingerprints.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import logging
import os
import socket
from typing import Any

import orjson

from .settings import Settings

__all__ = ["AuditError", "write_audit", "fingerprint", "operator"]

audit_log = logging.getLogger("pipeline.audit")


class AuditError(RuntimeError):
    """The audit record could not be written, so the audited operation does not happen."""


def fingerprint(value: str) -> str:
    """SHA-256 hex of ``value``: lets an auditor match a record to a request without holding the value."""
    return hashlib.sha256(value.encode()).hexdigest()


def operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with an arbitrary uid)
        user = f"uid:{os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


def write_audit(settings: Settings, kind: str, *, refusal: str = "nothing done", **fields: Any) -> dict[str, Any]:
    """Write one ``kind`` record (logger + optional file); raise ``AuditError`` if the file fails.

    ``refusal`` ends the error message: what the caller did not do because of it.
    """
    record: dict[str, Any] = {
        "audit": kind,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "user": operator(),
        "uid": os.getuid(),
        "host": socket.gethostname(),
        **fields,
    }
    path = settings.masking.audit_log
    if path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, orjson.dumps(record, default=str) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            audit_log.error("audit log unwritable", extra={"audit_log": path, "error": exc.strerror})
            raise AuditError(f"cannot write the audit log masking.audit_log {path}: {exc.strerror}; {refusal}") from None
    audit_log.info(kind, extra=record)
    return record
