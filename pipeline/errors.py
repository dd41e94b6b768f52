"""One line for the operator from whatever a command ends with: the backstop behind ``cli.main``.

Commands turn the failures they expect into ``PreflightError`` and friends with specific
messages. Whatever still escapes (a driver error from the middle of a command, a lost
connection, a file that cannot be written) must not become a traceback: the operator
gets the dependency, the error class and the driver's message, scrubbed of DSN secrets,
on one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from .dsn import scrub_dsn_secrets

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["PreflightError", "EXIT_CONFIG", "EXIT_FAILURE", "describe", "MIGRATE_HINT"]

EXIT_FAILURE = 1  # a dependency or an input failed
EXIT_CONFIG = 2  # the configuration is unusable


class PreflightError(Exception):
    """A dependency is missing or unreachable; one line for the operator."""


MIGRATE_HINT = "run `python -m pipeline migrate` or `run`"


def describe(exc: BaseException, settings: Settings | None = None) -> str:
    """``exc`` as one line without secrets (the caller prefixes ``error: ``)."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return describe(exc.exceptions[0], settings)
    dsn = settings.postgres.dsn.get_secret_value() if settings is not None else ""
    return " ".join(scrub_dsn_secrets(_describe(exc, settings), dsn).split())


def _describe(exc: BaseException, settings: Settings | None) -> str:
    table = settings.postgres.table if settings is not None else "the table"
    if isinstance(exc, asyncpg.UndefinedTableError):
        return f"table {table} does not exist yet; {MIGRATE_HINT}"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return f"PostgreSQL refused: {exc} (grant the role the privilege, or use one that has it)"
    if isinstance(exc, asyncpg.PostgresError):
        return f"PostgreSQL error {exc.sqlstate} ({type(exc).__name__}): {exc}"
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError)):
        return f"PostgreSQL connection failed mid-command ({type(exc).__name__}): {exc}"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found (standard chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, role)"
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        url = _kwarg(exc, "endpoint_url") or "AWS"
        verb = "did not answer in time" if isinstance(exc, ReadTimeoutError) else "is unreachable"
        return f"AWS endpoint {url} {verb}"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"AWS refused {exc.operation_name}: {err.get('Code', '?')}: {err.get('Message', '')}"
    if isinstance(exc, BotoCoreError):
        return f"AWS client error ({type(exc).__name__}): {exc}"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for a dependency"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror or exc}{where}"
    return f"{type(exc).__name__}: {exc}"


def _kwarg(exc: BaseException, name: str) -> Any:
    return getattr(exc, "kwargs", {}).get(name)
