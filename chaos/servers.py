"""The chaos run's own servers: they may be killed and restarted; the machine's may not.

- :class:`Postgres`: a cluster of its own (``initdb`` in a temporary directory, port 55432),
  run as the ``postgres`` user when this process is root; ``restart_immediate`` is
  ``pg_ctl restart -m immediate`` (a crash: no shutdown checkpoint, async commits lost).
- :class:`RedisServer`: a ``redis-server`` child on port 6390 without persistence, so a
  kill and restart gives an empty broker.
- :class:`RabbitVhost`: a vhost of its own on the machine's RabbitMQ (which must stay up);
  its fault is closing every connection of that vhost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def _pg_bin() -> Path:
    """``CHAOS_PG_BIN``, else the newest ``/usr/lib/postgresql/<version>/bin`` (Debian)."""
    if os.environ.get("CHAOS_PG_BIN"):
        return Path(os.environ["CHAOS_PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
PG_PORT = int(os.environ.get("CHAOS_PG_PORT", "55432"))
REDIS_PORT = int(os.environ.get("CHAOS_REDIS_PORT", "6390"))
AMQP_HOST = os.environ.get("CHAOS_AMQP_HOST", "127.0.0.1:5672")


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    """Run ``argv`` as the postgres user when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


class Postgres:
    """A throwaway PostgreSQL cluster: ``start()``, ``restart_immediate()``, ``stop()``."""

    def __init__(self, port: int = PG_PORT, root: Path | None = None) -> None:
        self.port = port
        self.root = root or Path(tempfile.mkdtemp(prefix="chaos-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args]
        return subprocess.run(
            _as_postgres(argv), capture_output=True, text=True, check=check, timeout=120
        )

    def start(self) -> Postgres:
        if port_answers(self.port):
            raise RuntimeError(f"port {self.port} is taken: pass CHAOS_PG_PORT=another")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                _as_postgres(
                    [
                        str(PG_BIN / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--no-sync",
                    ]
                ),
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c max_connections=300 -c shared_buffers=64MB"
        )
        self._pg_ctl("-o", options, "-w", "-t", "60", "start")
        return self

    def restart_immediate(self) -> None:
        """What a crash looks like: no checkpoint, every connection dropped, WAL replayed."""
        self._pg_ctl("-m", "immediate", "-w", "-t", "60", "restart")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("-m", "fast", "-w", "-t", "60", "stop", check=False)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        engine = sa.create_engine(
            self.admin_url(), isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.admin_url(name)


class RedisServer:
    """``redis-server --port N`` without persistence, as a child process of ours."""

    def __init__(self, port: int = REDIS_PORT, log_dir: Path | None = None) -> None:
        self.port = port
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"redis-{port}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if port_answers(self.port):
            raise RuntimeError(f"port {self.port} is taken: pass CHAOS_REDIS_PORT=another")
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 20
        while not port_answers(self.port):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {self.port} did not start ({self.log_path})")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: every queued and unacked message is gone (no persistence)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)
        self.popen = None

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self.popen = None


def _rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, check=check, timeout=120
    )


class RabbitVhost:
    """A vhost of our own on the machine's RabbitMQ: created empty, deleted afterwards."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"chaos-{uuid.uuid4().hex[:8]}"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{AMQP_HOST}/{self.name}"

    def start(self) -> RabbitVhost:
        _rabbitmqctl("add_vhost", self.name)
        _rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def close_connections(self) -> None:
        """Every client of this vhost loses its connection (the broker itself stays up)."""
        _rabbitmqctl(
            "close_all_connections", "--vhost", self.name, "--limit", "10000", "chaos: broker fault"
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            _rabbitmqctl("delete_vhost", self.name, check=False)
