"""Python 3.11 compatibility patch for LocalStack 4.12's KMS, installed into its venv.

LocalStack 4.12 calls ``uuid.uuid5(namespace, <bytes>)`` when it creates a KMS key, which
only Python >= 3.12 accepts; on 3.11 every ``CreateKey`` fails with "encoding without a
string argument". A ``.pth`` hook in the venv teaches ``uuid.uuid5`` the 3.12 behaviour
(hash the bytes as they are) before LocalStack imports anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["patch_venv"]

_MODULE = "_pipeline_py311_compat"
_SOURCE = '''"""Backport of Python 3.12's uuid.uuid5(namespace, bytes) for LocalStack's KMS (tests only)."""
import sys
import uuid

if sys.version_info < (3, 12):
    from hashlib import sha1

    _uuid5 = uuid.uuid5

    def uuid5(namespace, name):
        if isinstance(name, (bytes, bytearray)):
            return uuid.UUID(bytes=sha1(namespace.bytes + bytes(name)).digest()[:16], version=5)
        return _uuid5(namespace, name)

    uuid.uuid5 = uuid5
'''


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a concurrently starting LocalStack sees old or new, never half


def patch_venv(python: Path) -> None:
    """Install the hook into the venv whose interpreter is ``python`` (idempotent)."""
    venv = python.parent.parent
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if not site.is_dir():  # a venv of another Python: nothing to patch
        return
    _write_if_changed(site / f"{_MODULE}.py", _SOURCE)
    _write_if_changed(site / f"{_MODULE}.pth", f"import {_MODULE}\n")
