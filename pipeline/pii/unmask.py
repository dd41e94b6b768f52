"""Audited recovery of masked values: ``python -m pipeline unmask``.

Every use writes one audit record (JSON) through the ``pipeline.audit`` logger and, when
``masking.audit_log`` is set, appends it to that file (fsynced) before any original is
printed: if the record cannot be written, nothing is revealed. The record says when, who,
which key ids, how many values and in which mode, never a value, a token or the query
text (only its SHA-256, to match it against the request that justified it).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import argparse
import sys

import orjson

from stages.masking import KeyError_, Masker

from .query import Query, QueryRefused, parse_columns, parse_query, parse_where
from .read import QueryError, read_rows
from ..audit import AuditError, fingerprint, write_audit
from ..settings import Settings

__all__ = ["TOKEN", "looks_like_token", "Refused", "AuditError", "QueryError", "unmask_all", "unmask_rows", "audit",
           "unmask_command"]


# <key id>.<base64url(AES-SIV)>: the SIV tag alone is 16 bytes, i.e. at least 22 characters.
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{22,}")
TOKEN_SQL = r"^[A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{22,}$"


def looks_like_token(value: Any) -> bool:
    return isinstance(value, str) and TOKEN.fullmatch(value) is not None


class Refused(KeyError_):
    """Nothing is revealed: a value needs a missing key, is no token, is forged, or the query is refused.

    ``reason`` is what the audit record says: words, never a value, a token or the query text.
    """

    def __init__(self, message: str, missing_key_id: str | None = None, key_ids: Counter[str] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.missing_key_id = missing_key_id
        self.key_ids = key_ids
        self.reason = reason or message


def _check(masker: Masker, tokens: Iterable[str]) -> Counter[str]:
    """Key ids used, per value; refuse before decrypting anything if one is missing."""
    ids: Counter[str] = Counter(Masker.key_id_of(t) for t in tokens)
    missing = sorted(set(ids) - set(masker.key_ids))
    if missing:
        raise Refused(f"no key with id {missing[0]!r} in the key ring "
                      f"(it holds {', '.join(masker.key_ids)}); add it to masking.keys or masking.key_file",
                      missing[0], ids)
    return ids


def _reveal(masker: Masker, token: str, where: str) -> str:
    """``token``'s original; a forged, corrupt or non-canonical token is refused, naming its position."""
    try:
        return masker.unmask(token)
    except KeyError_:
        key_id = Masker.key_id_of(token)
        raise Refused(f"{where} does not decrypt under key {key_id!r} (corrupt or forged)",
                      reason=f"{where}: corrupt or forged token") from None


def unmask_all(masker: Masker, values: list[str]) -> tuple[list[str], Counter[str]]:
    """Originals of ``values`` (all or nothing) and the key ids they used.

    A value that names a key of the ring goes to ``Masker.unmask`` whatever follows, so a second
    spelling of a token (padding, whitespace, another alphabet) gets the forgery error, not a gentler one.
    """
    ring = set(masker.key_ids)
    for i, v in enumerate(values, 1):
        if not (looks_like_token(v) or Masker.key_id_of(v) in ring and "." in v):
            raise Refused(f"value #{i} is not a masked value (expected '<key id>.<base64>')",
                          reason=f"value #{i}: not a masked value")
    ids = _check(masker, values)
    return [_reveal(masker, v, f"value #{i}") for i, v in enumerate(values, 1)], ids


def unmask_rows(masker: Masker, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter[str], int]:
    """Rows with every token unmasked: ``masked_*`` columns and any value that looks like one.

    A ``masked_*`` value that is not a token (a pre-pipeline hash) is left as it is.
    """
    tokens = [v for r in rows for v in r.values() if looks_like_token(v)]
    ids = _check(masker, tokens)
    out = [{k: _reveal(masker, v, f"row #{n} {k}") if looks_like_token(v) else v for k, v in r.items()}
           for n, r in enumerate(rows, 1)]
    return out, ids, len(tokens)


def audit(settings: Settings, *, mode: str, key_ids: Counter[str] | None, count: int, outcome: str,
          **extra: Any) -> dict[str, Any]:
    """Write one unmask record (``pipeline.audit``); raise ``AuditError`` if the file fails."""
    return write_audit(settings, "unmask", refusal="nothing unmasked", mode=mode,
                       key_ids=dict(sorted((key_ids or Counter()).items())), count=count, outcome=outcome, **extra)


def query_fingerprint(sql: str) -> str:
    return fingerprint(sql)


def add_arguments(u: argparse.ArgumentParser) -> None:
    u.add_argument("values", nargs="*", metavar="VALUE", help="masked values; '-' or none: one per line on stdin")
    u.add_argument("--query", metavar="SQL",
                   help="print the rows of 'SELECT <columns>|* FROM <table> [WHERE …] [ORDER BY …] [LIMIT n]' as JSON "
                        "lines, every token unmasked (that form only: literals, no functions; see README)")
    u.add_argument("--where", metavar="COND", help="the same, as a condition on the table: \"user_id = '…'\"")
    u.add_argument("--columns", metavar="COLS", help="with --where: comma-separated columns to print (default: all)")
    u.add_argument("--limit", type=int, metavar="N", help="with --where: print at most N rows")


async def unmask_command(settings: Settings, args: argparse.Namespace) -> int:
    """``unmask VALUE…`` / ``unmask [-]`` (stdin) / ``unmask --query SQL`` / ``unmask --where COND``: audited, all or nothing."""
    from ..keyring import with_local_key
    from ..clients import masker_for

    values: list[str] = list(args.values)
    where, columns, limit = getattr(args, "where", None), getattr(args, "columns", None), getattr(args, "limit", None)
    structured = where is not None or columns is not None or limit is not None
    if args.query is not None:
        mode, asked = "query", args.query
    elif structured:
        mode, asked = "where", where or ""
    else:
        mode, asked = ("stdin" if values in ([], ["-"]) else "args"), None
    extra: dict[str, Any] = {"query_sha256": query_fingerprint(asked)} if asked is not None else {}
    ids: Counter[str] | None = None
    count = 0
    try:
        if asked is not None:
            option = "--query" if mode == "query" else "--where/--columns/--limit"
            if values:
                raise Refused(f"{option} takes no VALUE arguments", reason=f"{option} with VALUE arguments")
            if mode == "query" and structured:
                raise Refused("use either --query or --where/--columns/--limit, not both", reason="--query with --where")
            try:
                plan = (parse_query(args.query, settings.postgres.table) if mode == "query"
                        else _where_plan(settings, where, columns, limit))  # refused before any connection
                records, masker = await read_rows(settings, plan)
            except QueryRefused as exc:
                raise Refused(f"{option} refused: {exc.reason}", reason=f"query refused: {exc.reason}") from None
            rows, ids, count = unmask_rows(masker, [dict(r) for r in records])
            extra["rows"] = len(rows)
            lines = [orjson.dumps(r, default=str).decode() for r in rows]
        else:
            if mode == "stdin":  # a line is one value; only its line ending is not part of it
                values = [v for v in (line.rstrip("\r\n") for line in sys.stdin) if v]
            count = len(values)
            masker = await masker_for(with_local_key(settings))
            lines, ids = unmask_all(masker, values)
    except Exception as exc:  # every use is audited, a refused one too
        if isinstance(exc, Refused):
            if exc.key_ids:
                ids, count = exc.key_ids, max(count, sum(exc.key_ids.values()))
            extra |= {"missing_key_id": exc.missing_key_id} if exc.missing_key_id else {}
            extra["reason"] = exc.reason
            outcome = "refused"
        else:
            extra |= {"error": type(exc).__name__, "reason": getattr(exc, "reason", None) or _first_line(exc)}
            outcome = "error"
        audit(settings, mode=mode, key_ids=ids, count=count, outcome=outcome, **extra)
        raise
    audit(settings, mode=mode, key_ids=ids, count=count, outcome="ok", **extra)
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
    return 0


def _first_line(exc: BaseException) -> str:
    """An operator-facing error (redacted DSN, missing key file) in one line, or just its type."""
    from ..errors import PreflightError

    if isinstance(exc, (PreflightError, AuditError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return type(exc).__name__


def _where_plan(settings: Settings, where: str | None, columns: str | None, limit: int | None) -> Query:
    if limit is not None and limit < 0:
        raise QueryRefused("--limit must be 0 or more")
    return Query(parse_columns(columns) if columns else None, settings.postgres.table.lower(),
                 parse_where(where) if where is not None else None, limit=limit)
