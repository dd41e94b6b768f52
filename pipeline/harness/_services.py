"""LocalStack (SQS) in host mode, from a venv of its own cached on disk.

Shared by the test fixtures and by ``bench``: the embedded moto broker answers in
10-50 ms a request, far too slow to measure a pipeline against, while LocalStack serves
thousands of messages a second. No Docker: LocalStack's Python package runs directly.

It lives in the harness, not in the service: installing LocalStack runs ``pip``, which a
production process must never do. ``free_port`` and ``wait_http_ok`` belong to the core
(the embedded broker starts with them) and are only re-used here.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..embedded import free_port, wait_http_ok

__all__ = [
    "LOCALSTACK_REQUIREMENTS", "LocalStack", "ensure_venv", "installed", "free_port", "wait_http_ok",
    "clean_env", "tail",
]

# LocalStack >= 4.13 no longer runs on Python 3.11; the caps pin its deps to versions 4.12 works with.
LOCALSTACK_REQUIREMENTS = (
    "localstack-core[runtime]==4.12.0",
    "cbor2<5.7",
    "cryptography<45",
    "pyopenssl<25",
    "joserfc<1.3",
    "service_identity<25",
)


def clean_env() -> dict[str, str]:
    """Our environment minus what would leak this interpreter's packages into another Python."""
    return {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _marker_ok(venv: Path) -> bool:
    marker = venv / ".installed"
    return marker.exists() and marker.read_text() == "\n".join(LOCALSTACK_REQUIREMENTS)


def installed(venv: Path) -> bool:
    """Whether ``venv`` already holds the pinned LocalStack (no install needed)."""
    if not _marker_ok(venv):
        return False
    probe = subprocess.run([venv / "bin" / "python", "-c", "import localstack"], env=clean_env(),
                           capture_output=True, check=False)
    return probe.returncode == 0


def ensure_venv(venv: Path) -> Path:
    """Install LocalStack into ``venv`` once; return its python.

    A file lock keeps concurrent runs from installing over each other; the marker (holding
    the pinned requirements) is written only after a successful install, so a half-finished or
    outdated venv is rebuilt.
    """
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed(venv):
            return python
        shutil.rmtree(venv, ignore_errors=True)
        log = venv.parent / f"{venv.name}-install.log"
        with open(log, "wb") as out:
            # The venv's pip reads the system/user pip config and PIP_* variables (mirrors, certs).
            steps: list[list[str | Path]] = [
                [sys.executable, "-m", "venv", str(venv)],
                [python, "-m", "pip", "install", *LOCALSTACK_REQUIREMENTS],
            ]
            for cmd in steps:
                if subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env(), timeout=900, check=False
                ).returncode:
                    raise RuntimeError(f"LocalStack install failed: {cmd}\n{tail(log)}")
        (venv / ".installed").write_text("\n".join(LOCALSTACK_REQUIREMENTS))
        return python


class LocalStack:
    """A LocalStack (SQS + KMS) process on a free port, in its own process group."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, run_dir: Path) -> None:
        self.proc = proc
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.run_dir = run_dir
        self.log = run_dir / "localstack.log"

    @classmethod
    def start(cls, cache_dir: Path, timeout: float = 120) -> LocalStack:
        """Install (if needed) and start LocalStack; return once its health endpoint answers."""
        cache_dir = cache_dir.resolve()  # LocalStack runs with another cwd
        python = ensure_venv(cache_dir / "localstack-venv")
        port = free_port()
        # Per-instance scratch: LocalStack wipes its tmp folder on start/stop, which must not
        # hit a concurrently running instance.
        run_dir = Path(tempfile.mkdtemp(prefix="localstack-run-", dir=cache_dir))
        env = clean_env() | {
            "SERVICES": "sqs,kms",
            "GATEWAY_LISTEN": f"127.0.0.1:{port}",
            "LOCALSTACK_HOST": f"127.0.0.1:{port}",
            "SQS_ENDPOINT_STRATEGY": "off",  # queue URLs are http://127.0.0.1:PORT/<account>/<name>
            "SKIP_SSL_CERT_DOWNLOAD": "1",  # no network here; don't even try
            "DISABLE_EVENTS": "1",  # no analytics calls
            "LS_LOG": "warning",  # not a line per request: at bench rates the broker's own logging costs CPU
            "DNS_ADDRESS": "0",  # no DNS server: instances side by side would each try port 53
            "FILESYSTEM_ROOT": str(run_dir / "fs"),
            "TMPDIR": str(run_dir),
        }
        with open(run_dir / "localstack.log", "wb") as out:
            proc = subprocess.Popen(
                [str(python), "-m", "localstack.runtime.main"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=run_dir,
                start_new_session=True,
            )
        ls = cls(proc, port, run_dir)
        atexit.register(ls.stop)  # in case the caller's finalizer never runs
        try:
            wait_http_ok(f"{ls.endpoint}/_localstack/health", timeout, proc)
        except Exception as exc:
            ls.stop(keep_log=True)
            atexit.unregister(ls.stop)  # keep the log for a post-mortem
            raise RuntimeError(f"LocalStack did not start ({exc}); log {ls.log}:\n{tail(ls.log)}") from exc
        return ls

    def stop(self, keep_log: bool = False) -> None:
        """Kill the whole process group (TERM, then KILL) and drop the scratch dir; idempotent."""
        if self.proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if not keep_log:
            shutil.rmtree(self.run_dir, ignore_errors=True)
