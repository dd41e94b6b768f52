"""The masking key ring: where keys come from (env, a file, AWS KMS) and which one writes.

``stages.masking`` is the pure cipher; this module only gathers keys. Every entry is
``<key id>:<base64 key>`` or, wrapped under a KMS key, ``<key id>:kms:<base64 ciphertext
blob>``. Sources, in ring order:

* ``masking.key`` (``PIPELINE_MASKING__KEY``): the active key unless ``active_key_id`` says
  otherwise;
* ``masking.keys`` (``PIPELINE_MASKING__KEYS``): more keys, comma- or space-separated;
* ``masking.key_file``: a file with one entry per line (``#`` comments, blank lines ok);
* ``masking.kms_wrapped_keys``: entries that are all KMS-wrapped (the ``kms:`` marker is
  optional there).

Wrapped entries are unwrapped once at start-up with KMS ``Decrypt``; the encryption
context binds each blob to its key id, so a blob cannot be replayed under another id.
Errors are one line naming the key id and the source, never a secret.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
from pydantic import SecretStr

from stages.masking import KeyError_, Masker, MaskingKey, generate_key

from .settings import Settings

__all__ = [
    "KeyRingError", "Entry", "entries", "load_masker", "load_masker_sync", "wrap_key", "with_local_key",
    "encryption_context", "parse_plain", "kms_client",
]

log = logging.getLogger("pipeline.keyring")

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_SPLIT = re.compile(r"[,\s]+")
KMS_MARK = "kms:"


class KeyRingError(KeyError_):
    """The key ring cannot be built; one line naming the key id and the source."""


@dataclass(frozen=True)
class Entry:
    """One configured key before unwrapping: exactly one of ``secret`` / ``wrapped`` is set."""

    key_id: str
    source: str
    secret: bytes | None = None
    wrapped: bytes | None = None

    def __repr__(self) -> str:  # never print key material
        return f"Entry({self.key_id!r}, {self.source!r}, {'wrapped' if self.wrapped else 'plain'})"


def encryption_context(key_id: str) -> dict[str, str]:
    """KMS encryption context: a wrapped blob only unwraps under the key id it was made for."""
    return {"purpose": "login-pipeline-masking", "key_id": key_id}


def _b64(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4))


def parse_entry(text: str, source: str, *, wrapped: bool = False) -> Entry:
    """Parse one entry; errors name the source and, when it is well-formed, the key id."""
    key_id, sep, rest = text.strip().partition(":")
    if not sep or not _KEY_ID.fullmatch(key_id):
        # The part before ':' may be a pasted secret: do not echo it.
        raise KeyRingError(f"masking key in {source} must look like '<key id>:<base64 key>' "
                           "with an id of 1-16 characters [A-Za-z0-9_-] (see `python -m pipeline keygen`)")
    is_wrapped = wrapped or rest.startswith(KMS_MARK)
    if rest.startswith(KMS_MARK):
        rest = rest[len(KMS_MARK):]
    try:
        raw = _b64(rest)
    except (binascii.Error, ValueError):
        raise KeyRingError(f"masking key {key_id!r} in {source} is not valid base64") from None
    if is_wrapped:
        if not raw:
            raise KeyRingError(f"masking key {key_id!r} in {source}: empty KMS ciphertext")
        return Entry(key_id, source, wrapped=raw)
    try:
        MaskingKey(key_id, raw)
    except KeyError_ as exc:
        raise KeyRingError(f"masking key {key_id!r} in {source}: {exc}") from None
    return Entry(key_id, source, secret=raw)


def _read_key_file(path: Path) -> list[tuple[int, str]]:
    """``(line number, entry)`` for each line that holds one."""
    source = f"masking.key_file {path}"
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise KeyRingError(f"{source} not found") from None
    except OSError as exc:
        raise KeyRingError(f"{source} cannot be read: {exc.strerror}") from None
    if mode & 0o077:
        log.warning("masking key file is readable by group or others; chmod 600 it", extra={"key_file": str(path)})
    lines = ((n, raw.split("#", 1)[0].strip()) for n, raw in enumerate(text.splitlines(), 1))
    return [(n, line) for n, line in lines if line]


def entries(settings: Settings) -> list[Entry]:
    """All configured entries in ring order, duplicates (same id, same material) dropped."""
    m = settings.masking
    found: list[Entry] = []
    if m.key.get_secret_value().strip():
        found.append(parse_entry(m.key.get_secret_value(), "masking.key (PIPELINE_MASKING__KEY)"))
    for text in _SPLIT.split(m.keys.get_secret_value().strip()):
        if text:
            found.append(parse_entry(text, "masking.keys (PIPELINE_MASKING__KEYS)"))
    if m.key_file:
        path = Path(m.key_file)
        for n, text in _read_key_file(path):
            found.append(parse_entry(text, f"masking.key_file {path} line {n}"))
    for text in _SPLIT.split(m.kms_wrapped_keys.strip()):
        if text:
            found.append(parse_entry(text, "masking.kms_wrapped_keys (PIPELINE_MASKING__KMS_WRAPPED_KEYS)", wrapped=True))
    ring: dict[str, Entry] = {}
    for e in found:
        seen = ring.get(e.key_id)
        if seen is None:
            ring[e.key_id] = e
        elif (seen.secret, seen.wrapped) != (e.secret, e.wrapped):
            raise KeyRingError(f"masking key id {e.key_id!r} is defined twice with different keys "
                               f"({seen.source} and {e.source})")
    return list(ring.values())


def _active(settings: Settings, ring: list[Entry]) -> str:
    if not ring:
        raise KeyRingError("no masking key: set PIPELINE_MASKING__KEY (generate one with `python -m pipeline keygen`) "
                           "or masking.keys / masking.key_file / masking.kms_wrapped_keys")
    m = settings.masking
    if m.active_key_id:
        if m.active_key_id not in {e.key_id for e in ring}:
            ids = ", ".join(e.key_id for e in ring)
            raise KeyRingError(f"active masking key id {m.active_key_id!r} (masking.active_key_id) "
                               f"is not in the key ring ({ids})")
        return m.active_key_id
    return ring[0].key_id  # the `key` when set (it comes first), else the first found


def _masker(settings: Settings, ring: list[Entry], keys: list[MaskingKey]) -> Masker:
    active = _active(settings, ring)
    masker = Masker(keys, active)
    log.info("masking key ring loaded", extra={"active_key_id": active, "key_ids": masker.key_ids,
                                               "wrapped": [e.key_id for e in ring if e.wrapped]})
    return masker


def load_masker_sync(settings: Settings) -> Masker:
    """The ring without KMS (wrapped entries are an error here: they need ``load_masker``)."""
    ring = entries(settings)
    wrapped = [e for e in ring if e.wrapped]
    if wrapped:
        raise KeyRingError(f"masking key {wrapped[0].key_id!r} in {wrapped[0].source} is KMS-wrapped "
                           "and needs the asynchronous loader")
    return _masker(settings, ring, [MaskingKey(e.key_id, e.secret) for e in ring])  # type: ignore[arg-type]


async def load_masker(settings: Settings) -> Masker:
    """The ring, unwrapping KMS-wrapped entries (one ``Decrypt`` each, concurrently)."""
    ring = entries(settings)
    _active(settings, ring)  # fail on config before calling KMS
    wrapped = [e for e in ring if e.wrapped]
    plain: dict[str, bytes] = {}
    if wrapped:
        async with kms_client(settings) as kms:
            secrets = await asyncio.gather(*(_unwrap(kms, settings, e) for e in wrapped))
        plain = {e.key_id: s for e, s in zip(wrapped, secrets)}
    keys = []
    for e in ring:
        secret = e.secret if e.secret is not None else plain[e.key_id]
        try:
            keys.append(MaskingKey(e.key_id, secret))
        except KeyError_ as exc:
            raise KeyRingError(f"masking key {e.key_id!r} from {e.source} (unwrapped by KMS): {exc}") from None
    return _masker(settings, ring, keys)


def kms_client(settings: Settings) -> Any:
    """An aiobotocore KMS client; endpoint ``masking.kms_endpoint_url``, else ``sqs.endpoint_url``."""
    endpoint = settings.masking.kms_endpoint_url or settings.sqs.endpoint_url or None
    config = AioConfig(connect_timeout=5, read_timeout=15, retries={"mode": "standard", "max_attempts": 4})
    return get_session().create_client("kms", region_name=settings.sqs.region, endpoint_url=endpoint, config=config)


def _kms_problem(exc: BaseException, settings: Settings, doing: str) -> KeyRingError:
    endpoint = settings.masking.kms_endpoint_url or settings.sqs.endpoint_url or "AWS"
    if isinstance(exc, EndpointConnectionError):
        return KeyRingError(f"KMS endpoint {endpoint} is unreachable ({doing})")
    if isinstance(exc, NoCredentialsError):
        return KeyRingError(f"no AWS credentials for KMS ({doing})")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "")
        hint = " (wrong KMS key, a blob made for another key id, or a corrupt blob)" if code == "InvalidCiphertextException" else ""
        detail = f": {err['Message']}" if err.get("Message") else ""
        return KeyRingError(f"KMS refused ({doing}): {code}{detail}{hint}")
    return KeyRingError(f"KMS failed ({doing}): {type(exc).__name__}")


async def _unwrap(kms: Any, settings: Settings, e: Entry) -> bytes:
    args: dict[str, Any] = {"CiphertextBlob": e.wrapped, "EncryptionContext": encryption_context(e.key_id)}
    if settings.masking.kms_key_id:
        args["KeyId"] = settings.masking.kms_key_id  # refuse blobs wrapped under any other KMS key
    try:
        return (await kms.decrypt(**args))["Plaintext"]
    except (BotoCoreError, ClientError) as exc:
        raise _kms_problem(exc, settings, f"unwrapping masking key {e.key_id!r} from {e.source}") from None


async def wrap_key(settings: Settings, kms_key_id: str, key: MaskingKey | None = None, key_id: str | None = None) -> str:
    """``<key id>:kms:<blob>`` for ``key`` (a fresh one by default), encrypted under ``kms_key_id``.

    The data key is made here (64 random bytes) and sent to KMS ``Encrypt``, rather than
    asked of ``GenerateDataKey``: the same call wraps an existing key, and emulators that
    cap data keys at 32 bytes still give AES-256-SIV keys.
    """
    if not kms_key_id:
        raise KeyRingError("no KMS key: pass --kms-key-id ARN or set masking.kms_key_id (PIPELINE_MASKING__KMS_KEY_ID)")
    key = key or generate_key(key_id)
    async with kms_client(settings) as kms:
        try:
            blob = (await kms.encrypt(KeyId=kms_key_id, Plaintext=key.secret,
                                      EncryptionContext=encryption_context(key.key_id)))["CiphertextBlob"]
        except (BotoCoreError, ClientError) as exc:
            raise _kms_problem(exc, settings, f"wrapping masking key {key.key_id!r} under KMS key {kms_key_id}") from None
    return f"{key.key_id}:{KMS_MARK}{base64.urlsafe_b64encode(blob).decode()}"


def with_local_key(settings: Settings) -> Settings:
    """The embedded default's generated key when nothing is configured (embedded only)."""
    if settings.masking.configured or not settings.embedded:
        return settings
    from .embedded import local_key

    key = SecretStr(local_key(settings.pipeline.state_dir))
    return settings.model_copy(update={"masking": settings.masking.model_copy(update={"key": key})})


def parse_plain(text: str, source: str = "stdin") -> MaskingKey:
    """A plain ``<key id>:<base64>`` key (for wrapping an existing key)."""
    e = parse_entry(text, source)
    if e.secret is None:
        raise KeyRingError(f"masking key {e.key_id!r} in {source} is already KMS-wrapped")
    return MaskingKey(e.key_id, e.secret)

