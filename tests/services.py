"""Real backing services for tests, built from Python + PyPI only (no Docker).

* LocalStack (SQS, KMS) in host mode, from a venv of its own, cached under ``.cache``.
* PostgreSQL 16 from the ``pgserver`` wheel, restartable mid-test.
* A threaded TCP proxy that can cut a service off and restore it.
"""

from __future__ import annotations

import atexit
import selectors
import socket
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Self

from pipeline.embedded import free_port
from pipeline.harness._services import LocalStack  # noqa: F401  (re-exported: the fixtures' API)
from pipeline.harness._services import tail as _tail


REGION = "us-east-1"


def sqs_client(endpoint: str, **config: Any) -> Any:
    """A sync botocore SQS client for LocalStack (or a proxy in front of it); ``config`` -> botocore Config."""
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "sqs",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=botocore.config.Config(**config),
    )


class Postgres:
    """PostgreSQL 16 from the ``pgserver`` wheel, listening on a unix socket and 127.0.0.1:port.

    pgserver does initdb and the first start (as root it creates a ``pgserver`` system user and
    runs the server as that user, because postgres refuses to run as root). We then restart it
    with our own ``pg_ctl`` options -- as that same user -- to add a TCP port and to be able to
    ``stop()``/``start()`` it mid-test; the DSNs stay valid across restarts.
    """

    def __init__(self, data_dir: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about a missing XDG_RUNTIME_DIR on import
            import pgserver
            from pgserver.postgres_server import get_server

        self._bin = Path(pgserver.__file__).parent / "pginstall" / "bin"
        srv = get_server(data_dir, cleanup_mode=None)  # we stop it ourselves in close()
        self.data_dir: Path = srv.pgdata
        self._user: str | None = srv.system_user  # None unless we are root
        self._closed = False
        atexit.register(self.close)  # the server is up now: never leak it, even if we fail below
        socket_dir = srv.get_postmaster_info().socket_dir
        assert socket_dir is not None
        self.socket_dir: Path = socket_dir
        self.port = free_port()
        self.dsn = self.url()
        self.tcp_dsn = self.url(tcp=True)
        self.stop()
        self.start()

    def url(self, database: str = "postgres", *, tcp: bool = False) -> str:
        """DSN of ``database`` as superuser ``postgres`` (trust auth), via unix socket or TCP."""
        if tcp:
            return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def _ctl(self, *args: str) -> None:
        # Output goes to a file, not a pipe: the postmaster started by pg_ctl could hold a pipe open.
        with tempfile.TemporaryFile() as out:
            res = subprocess.run(
                [self._bin / "pg_ctl", "-D", str(self.data_dir), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=self._user,
                timeout=120,
                check=False,
            )
            if res.returncode:
                out.seek(0)
                output = out.read().decode(errors="replace")
                raise RuntimeError(f"pg_ctl {' '.join(args)} failed:\n{output}\n{_tail(self.data_dir / 'log')}")

    @property
    def running(self) -> bool:
        res = subprocess.run(
            [self._bin / "pg_ctl", "-D", str(self.data_dir), "status"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=self._user,
            check=False,
        )
        return res.returncode == 0

    def start(self) -> None:
        """Start the server if it is down (idempotent), on the same socket and port as before."""
        if self.running:
            return
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir} -c fsync=off"
        self._ctl("-w", "-t", "60", "-l", str(self.data_dir / "log"), "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: 'fast' disconnects clients and shuts down cleanly, 'immediate' ~ a crash."""
        if self.running:
            self._ctl("-w", "-t", "60", "-m", mode, "stop")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as superuser with the bundled psql; unaligned, tuples-only output."""
        res = subprocess.run(
            [self._bin / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.url(database), "-c", sql],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if res.returncode:
            raise RuntimeError(f"psql failed ({sql!r}): {res.stderr}")
        return res.stdout

    def close(self) -> None:
        """Stop the server for good; idempotent."""
        if not self._closed:
            self._closed = True
            self.stop()


class TcpProxy:
    """Threaded TCP forwarder 127.0.0.1:port -> target, to make a service unreachable on demand.

    ``block()`` closes the listener (new connections are refused) and shuts down every open
    connection; ``unblock()`` listens again on the same port, so endpoints stay valid.
    """

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.unblock()

    @classmethod
    def to_url(cls, url: str) -> TcpProxy:
        """Proxy for an http://host:port endpoint."""
        host, _, port = url.split("://", 1)[-1].split("/", 1)[0].rpartition(":")
        return cls(host, int(port))

    @property
    def blocked(self) -> bool:
        return self._listener is None

    def unblock(self) -> None:
        """Accept connections again (no-op if not blocked)."""
        with self._lock:
            if self._listener is not None:
                return
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", self.port))
            ls.listen(128)
            ls.settimeout(0.1)  # lets the acceptor notice block() promptly
            self._listener = ls
            self._acceptor = threading.Thread(target=self._accept, args=(ls,), daemon=True)
            self._acceptor.start()

    def block(self) -> None:
        """Refuse new connections and cut the open ones; returns once the port is closed."""
        with self._lock:
            ls, self._listener = self._listener, None
            for s in self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)  # wakes the pump thread, which closes it
                except OSError:
                    pass
        if ls is not None:
            assert self._acceptor is not None
            self._acceptor.join()
            ls.close()

    close = block

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self, ls: socket.socket) -> None:
        while self._listener is ls:
            try:
                client, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.setblocking(True)
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        pair = (client, upstream)
        with self._lock:
            if self._listener is None:  # blocked while we were connecting
                for s in pair:
                    s.close()
                return
            self._conns.update(pair)
        peer = {client: upstream, upstream: client}
        sel = selectors.DefaultSelector()
        for s in pair:
            sel.register(s, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(65536)
                    if not data:
                        return
                    peer[src].sendall(data)
        except OSError:
            pass
        finally:
            sel.close()
            with self._lock:
                self._conns.difference_update(pair)
            for s in pair:
                s.close()
