"""Audited recovery of masked values: ``python -m pipeline unmask``.

Every use writes one audit record (JSON) through the ``pipeline.audit`` logger and, when
``masking.audit_log`` is set, appends it to that file (fsynced) before any original is
printed: if the record cannot be written, nothing is revealed. The record says when, who,
which key ids, how many values and in which mode, never a value, a token or the query
text (only its SHA-256, to match it against the request that justified it).
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import logging
import os
import re
import socket
from collections import Counter
from collections.abc import Iterable
from typing import Any

import argparse
import sys

import asyncpg
import orjson

from stages.masking import KeyError_, Masker

from .settings import Settings

__all__ = ["TOKEN", "looks_like_token", "Refused", "AuditError", "unmask_all", "unmask_rows", "audit", "unmask_command"]

audit_log = logging.getLogger("pipeline.audit")

# <key id>.<base64url(AES-SIV)>: the SIV tag alone is 16 bytes, i.e. at least 22 characters.
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{22,}")
TOKEN_SQL = r"^[A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{22,}$"


def looks_like_token(value: Any) -> bool:
    return isinstance(value, str) and TOKEN.fullmatch(value) is not None


class Refused(KeyError_):
    """A value needs a key the ring does not hold, or is not a masked value."""

    def __init__(self, message: str, missing_key_id: str | None = None, key_ids: Counter[str] | None = None) -> None:
        super().__init__(message)
        self.missing_key_id = missing_key_id
        self.key_ids = key_ids


class QueryError(RuntimeError):
    """``--query`` failed in PostgreSQL (shown to the operator; only its type is audited)."""


class AuditError(RuntimeError):
    """The audit record could not be written, so nothing is revealed."""


def _check(masker: Masker, tokens: Iterable[str]) -> Counter[str]:
    """Key ids used, per value; refuse before decrypting anything if one is missing."""
    ids: Counter[str] = Counter(Masker.key_id_of(t) for t in tokens)
    missing = sorted(set(ids) - set(masker.key_ids))
    if missing:
        raise Refused(f"no key with id {missing[0]!r} in the key ring "
                      f"(it holds {', '.join(masker.key_ids)}); add it to masking.keys or masking.key_file",
                      missing[0], ids)
    return ids


def unmask_all(masker: Masker, values: list[str]) -> tuple[list[str], Counter[str]]:
    """Originals of ``values`` (all or nothing) and the key ids they used."""
    for i, v in enumerate(values, 1):
        if not looks_like_token(v):
            raise Refused(f"value #{i} is not a masked value (expected '<key id>.<base64>')")
    ids = _check(masker, values)
    return [masker.unmask(v) for v in values], ids


def unmask_rows(masker: Masker, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter[str], int]:
    """Rows with every token unmasked: ``masked_*`` columns and any value that looks like one.

    A ``masked_*`` value that is not a token (a pre-pipeline hash) is left as it is.
    """
    tokens = [v for r in rows for v in r.values() if looks_like_token(v)]
    ids = _check(masker, tokens)
    out = [{k: masker.unmask(v) if looks_like_token(v) else v for k, v in r.items()} for r in rows]
    return out, ids, len(tokens)


def audit(settings: Settings, *, mode: str, key_ids: Counter[str] | None, count: int, outcome: str,
          **extra: Any) -> dict[str, Any]:
    """Write one audit record (logger + optional file); raise ``AuditError`` if the file fails."""
    record: dict[str, Any] = {
        "audit": "unmask",
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "user": _user(),
        "uid": os.getuid(),
        "host": socket.gethostname(),
        "mode": mode,
        "key_ids": dict(sorted((key_ids or Counter()).items())),
        "count": count,
        "outcome": outcome,
        **extra,
    }
    path = settings.masking.audit_log
    if path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, orjson.dumps(record) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            audit_log.error("audit log unwritable", extra={"audit_log": path, "error": exc.strerror})
            raise AuditError(f"cannot write the audit log masking.audit_log {path}: {exc.strerror}; nothing unmasked") from None
    audit_log.info("unmask", extra=record)
    return record


def query_fingerprint(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


def _user() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with an arbitrary uid)
        user = f"uid:{os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


async def unmask_command(settings: Settings, args: argparse.Namespace) -> int:
    """``unmask VALUE…`` / ``unmask [-]`` (stdin) / ``unmask --query SQL``: audited, all or nothing."""
    from .keyring import with_local_key
    from .runner import masker_for

    values: list[str] = list(args.values)
    mode = "query" if args.query else ("stdin" if values in ([], ["-"]) else "args")
    extra: dict[str, Any] = {"query_sha256": query_fingerprint(args.query)} if args.query else {}
    ids: Counter[str] | None = None
    count = 0
    try:
        if mode == "query":
            if values:
                raise Refused("--query takes no VALUE arguments")
            records, masker = await _query(settings, args.query)
            rows, ids, count = unmask_rows(masker, [dict(r) for r in records])
            extra["rows"] = len(rows)
            lines = [orjson.dumps(r, default=str).decode() for r in rows]
        else:
            if mode == "stdin":
                values = [line.strip() for line in sys.stdin if line.strip()]
            count = len(values)
            masker = await masker_for(with_local_key(settings))
            lines, ids = unmask_all(masker, values)
    except Exception as exc:  # every use is audited, a refused one too
        if isinstance(exc, Refused):
            if exc.key_ids:
                ids, count = exc.key_ids, max(count, sum(exc.key_ids.values()))
            extra |= {"missing_key_id": exc.missing_key_id} if exc.missing_key_id else {}
        audit(settings, mode=mode, key_ids=ids, count=count,
              outcome="refused" if isinstance(exc, Refused) else "error", error=type(exc).__name__, **extra)
        raise
    audit(settings, mode=mode, key_ids=ids, count=count, outcome="ok", **extra)
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
    return 0


async def _query(settings: Settings, sql: str) -> tuple[list[asyncpg.Record], Masker]:
    from .embedded import embedded
    from .runner import connect_postgres, masker_for

    async with embedded(settings, broker=False) as effective:
        masker = await masker_for(effective)
        conn = await connect_postgres(effective)
        try:
            async with conn.transaction(readonly=True):  # recovery reads; it never writes
                return await conn.fetch(sql), masker
        except asyncpg.PostgresError as exc:
            raise QueryError(f"query failed: {type(exc).__name__}: {exc}") from None
        finally:
            await conn.close()
