"""PostgreSQL DSNs as the operator wrote them and as the driver reads them, without ever printing a password.

asyncpg (like libpq) ends the user-info at the *first* ``@`` and the host at the first ``/``,
so a password with an unescaped ``@`` or ``/`` silently turns into a host, a port or a database
name. Redaction splits at the *last* ``@`` (what the operator meant, so the whole password is
hidden); ``dsn_targets`` asks asyncpg's own parser what it will really try, so connection errors
name the address that actually failed, with the password's pieces masked.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

__all__ = ["redact_dsn", "scrub_dsn_secrets", "password_misread", "dsn_targets", "dsn_hint", "dsn_problem"]

# ``password=`` in a URI query or a libpq ``key=value`` DSN, quoted or not.
_PASSWORD_PARAM = re.compile(r"((?:^|[?&\s])password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)", re.IGNORECASE)


def _userinfo(dsn: str) -> tuple[str, str, str] | None:
    """(scheme://user, password, @rest) of a URI DSN with a password, split at the *last* ``@``.

    The last, not the first: a password with an unescaped ``@`` or ``/`` must still be found
    (libraries that split at the first ``@`` would read part of it as the host).
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return None
    userinfo, at, host = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not (at and colon):
        return None
    return f"{scheme}://{user}", password, f"@{host}"


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced, for logs and errors, however the password is given."""
    parts = _userinfo(dsn)
    if parts is not None:
        dsn = f"{parts[0]}:***{parts[2]}"
    elif "://" not in dsn and "=" not in dsn:
        return "<unparseable dsn>"  # not a URI nor key=value: it could be anything, a password included
    return _PASSWORD_PARAM.sub(r"\1***", dsn)


def scrub_dsn_secrets(text: str, dsn: str) -> str:
    """``text`` (e.g. a driver's error message) without the DSN's password or recognisable pieces of it."""
    secrets = [m.group(2).strip("'") for m in _PASSWORD_PARAM.finditer(dsn)]
    parts = _userinfo(dsn)
    if parts is not None:
        secrets.append(parts[1])
    pieces = {p for s in secrets if s for p in [s, *re.split(r"[@:/?#&]", s)] if len(p) >= 3}
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "***")
    return text


_ENCODE_HINT = "percent-encode it ('@' as %40, '/' as %2F)"


def password_misread(dsn: str) -> bool:
    """Does the password hold an unescaped ``@`` or ``/``, which asyncpg and libpq end it at?

    Both read the host from the text after the *first* ``@`` (before the first ``/``), so such a
    DSN connects somewhere else than it says: a piece of the password becomes the host, port or
    database name.
    """
    parts = _userinfo(dsn.split("?", 1)[0])
    return parts is not None and ("@" in parts[1] or "/" in parts[1])


def _mask_pieces(text: str, dsn: str) -> str:
    """``text`` (a host or port the driver read) with every ``@``-separated piece of the password masked."""
    parts = _userinfo(dsn.split("?", 1)[0])
    if parts is None or not parts[1] or not password_misread(dsn):  # read as meant: nothing came from the password
        return text
    return "@".join("***" if t and t in parts[1] else t for t in text.split("@"))


def _driver_parse(dsn: str) -> tuple[list[Any], Any]:
    """asyncpg's own DSN parser, so messages name what the driver really tries (private API: guarded)."""
    from asyncpg import connect_utils

    fn = connect_utils._parse_connect_dsn_and_args
    args = {name: None for name in inspect.signature(fn).parameters}
    return fn(**{**args, "dsn": dsn})  # type: ignore[no-any-return]


def dsn_targets(dsn: str) -> list[str] | None:
    """The addresses the driver will try (``host:port`` or a socket path), password pieces masked.

    ``None`` when that cannot be told (the DSN does not parse, or asyncpg's parser changed).
    """
    try:
        addrs, _ = _driver_parse(dsn)
    except Exception:  # noqa: BLE001 - only a better message is at stake; connecting reports the error
        return None
    return [_mask_pieces(a[0], dsn) + ":" + _mask_pieces(str(a[1]), dsn) if isinstance(a, tuple) else str(a)
            for a in addrs]


def dsn_hint(dsn: str) -> str:
    """What to tell the operator about a DSN whose password the driver misreads ('' if it does not)."""
    if not password_misread(dsn):
        return ""
    n = dsn.split("?", 1)[0].count("@")
    what = f"has {n} '@'" if n > 1 else "has a '/' in its password"
    return (f"; the DSN {what}: the driver ends the password at the first '@' or '/' and reads the rest as the host, "
            "so the password probably needs percent-encoding ('@' as %40, '/' as %2F)")


def dsn_problem(dsn: str) -> str | None:
    """Why the driver cannot use ``dsn`` at all, in words that never quote the password; None if it can."""
    scheme, sep, _ = dsn.partition("://")
    if not sep:
        return "must be a postgresql:// URI (like postgresql://user:password@host:5432/db); key=value DSNs are not supported"
    if scheme not in ("postgresql", "postgres"):
        return f"must start with postgresql:// or postgres://, not {scheme[:20]}://"
    try:
        _driver_parse(dsn)
    except ValueError as exc:
        if password_misread(dsn):
            return "the driver cannot parse it: its password has an unescaped '@' or '/'; " + _ENCODE_HINT
        return f"the driver cannot parse it: {scrub_dsn_secrets(str(exc), dsn)}"
    except Exception:  # noqa: BLE001 - e.g. an sslrootcert that is missing: connecting reports it
        return None
    return None
