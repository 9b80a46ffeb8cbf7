"""Throwaway PostgreSQL databases and Redis DB numbers for tests.

Everything is overridable by environment variables so a developer can point the suite at
other servers:

- ``SAGAS_TEST_PG_ADMIN_URL``  (default ``postgresql+psycopg2://postgres@127.0.0.1:5432/postgres``;
  a ``postgresql+psycopg://`` URL runs the tests' databases on psycopg 3)
- ``SAGAS_TEST_REDIS_URL``     (default ``redis://127.0.0.1:6379``; the DB number is chosen here)
- ``SAGAS_TEST_AMQP_URL``      (default ``amqp://guest:guest@127.0.0.1:5672//``)

Redis DB numbers 1..15 are handed out in turn. Several pytest processes may share one Redis
(people run parts of the suite side by side), so each DB number handed out is leased with a key
in DB 0 naming the owner process; other processes skip leased numbers until the lease is
released (:func:`release_redis_db`), its owner process is gone, or it expires.

A process never hands out a number it still holds (the session deployment keeps its DB for
the whole run while per-test DBs come and go around it), and a daemon thread renews the
process's leases while it holds them, so a run longer than the lease keeps its DBs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import threading
import time
import uuid
from typing import Literal
from urllib.parse import urlsplit

import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

DEFAULT_PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

ServiceKind = Literal["postgresql", "postgres", "redis", "rabbitmq", "amqp"]

# --------------------------------------------------------------------------- PostgreSQL


def pg_admin_url() -> str:
    """URL of a database (normally ``postgres``) from which test databases are created."""
    return os.environ.get("SAGAS_TEST_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL)


def _admin_engine() -> sa.Engine:
    return sa.create_engine(
        pg_admin_url(),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )


def _safe_identifier(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"unsafe database name {name!r}")
    return name


def create_pg_database(prefix: str = "sagas_test") -> str:
    """Create a new, uniquely named database and return its SQLAlchemy URL (the admin
    URL's driver: psycopg2 unless ``SAGAS_TEST_PG_ADMIN_URL`` names another)."""
    cleaned = re.sub(r"[^a-z0-9_]", "_", prefix.lower())[:40] or "sagas_test"
    if not re.match(r"[a-z_]", cleaned):
        cleaned = f"t_{cleaned}"
    name = _safe_identifier(f"{cleaned}_{uuid.uuid4().hex[:12]}")
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    url = make_url(pg_admin_url()).set(database=name)
    return url.render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    """Drop the database named in ``url``, terminating its connections first."""
    name = make_url(url).database
    if not name:
        raise ValueError(f"no database in {url!r}")
    name = _safe_identifier(name)
    if name == make_url(pg_admin_url()).database:
        raise ValueError(f"refusing to drop the admin database {name!r}")
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- Redis

REDIS_TEST_DBS = range(1, 16)
_LEASE_KEY = "celery_sagas:test:redis-db-lease:{db}"
_LEASE_SECONDS = 3600
_RENEW_EVERY = 60.0
_redis_lock = threading.Lock()
_redis_cycle = itertools.cycle(REDIS_TEST_DBS)
# DB numbers this process holds, by owner (a forked child holds none of its parent's)
_held: dict[str, set[int]] = {}
_renewer: threading.Thread | None = None


def redis_base_url() -> str:
    """The Redis server URL without a DB number (any number in the setting is dropped)."""
    parts = urlsplit(os.environ.get("SAGAS_TEST_REDIS_URL", DEFAULT_REDIS_URL))
    return f"{parts.scheme}://{parts.netloc}"


def _redis_client(db: int) -> redis.Redis:
    return redis.Redis.from_url(
        f"{redis_base_url()}/{db}",
        socket_connect_timeout=3,
        socket_timeout=5,
        decode_responses=True,
    )


def _owner() -> str:
    # Recomputed so a forked child does not pose as its parent.
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_gone(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def held_redis_dbs() -> set[int]:
    """The DB numbers this process holds right now (handed out, not yet released)."""
    return _held.setdefault(_owner(), set())


def _try_lease(control: redis.Redis, db: int) -> bool:
    if db in held_redis_dbs():
        # Still in use by this process (the session deployment's DB, say): handing it out
        # again would flush it under its user, and releasing it would drop the lease that
        # keeps other test runs out of it.
        return False
    key = _LEASE_KEY.format(db=db)
    me = _owner()
    if control.set(key, me, nx=True, ex=_LEASE_SECONDS):
        return True
    holder = control.get(key)
    if holder is None or holder == me or _owner_is_gone(str(holder)):
        control.set(key, me, ex=_LEASE_SECONDS)
        return True
    return False


def lease_holder(db: int) -> str | None:
    """The owner (``host:pid``) named by the lease of Redis DB ``db``, or None."""
    control = _redis_client(0)
    try:
        holder = control.get(_LEASE_KEY.format(db=db))
        return None if holder is None else str(holder)
    finally:
        control.close()


def renew_redis_leases() -> list[int]:
    """Extend the lease of every DB this process holds; returns the numbers renewed.

    A lease that names another owner (taken over after it expired) is left alone."""
    renewed: list[int] = []
    with _redis_lock:
        held = sorted(held_redis_dbs())
        if not held:
            return renewed
        control = _redis_client(0)
        try:
            for db in held:
                key = _LEASE_KEY.format(db=db)
                if control.get(key) == _owner() and control.expire(key, _LEASE_SECONDS):
                    renewed.append(db)
        finally:
            control.close()
    return renewed


def _renew_forever() -> None:
    while True:
        time.sleep(_RENEW_EVERY)
        with contextlib.suppress(redis.RedisError):  # Redis restarting: the next round
            renew_redis_leases()


def _start_renewer() -> None:
    global _renewer
    if _renewer is None or not _renewer.is_alive():
        _renewer = threading.Thread(target=_renew_forever, name="redis-test-db-leases", daemon=True)
        _renewer.start()


def redis_test_url(wait: float = 60.0) -> str:
    """Return the URL of a Redis DB (1..15) that was just flushed and is leased to this process.

    Successive calls cycle through the numbers and skip those this process still holds, so
    a DB is never handed out twice before it is released (:func:`release_redis_db`).
    Waits up to ``wait`` seconds when every number is held.
    """
    deadline = time.monotonic() + wait
    with _redis_lock:
        control = _redis_client(0)
        try:
            while True:
                for _ in REDIS_TEST_DBS:
                    db = next(_redis_cycle)
                    if _try_lease(control, db):
                        client = _redis_client(db)
                        try:
                            client.flushdb()
                        finally:
                            client.close()
                        held_redis_dbs().add(db)
                        _start_renewer()
                        return f"{redis_base_url()}/{db}"
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        "every Redis test DB (1..15) is leased by another test process"
                    )
                time.sleep(0.2)
        finally:
            control.close()


def release_redis_db(url: str) -> None:
    """Give back a DB number handed out by :func:`redis_test_url`: flushed and unleased if
    this process still holds it, untouched otherwise (another run may be using it)."""
    path = urlsplit(url).path.strip("/")
    if not path.isdigit():
        return
    db = int(path)
    with _redis_lock:
        if db not in held_redis_dbs():
            return  # not ours (or released already): another run may be using it
        held_redis_dbs().discard(db)
        client = _redis_client(db)
        control = _redis_client(0)
        try:
            key = _LEASE_KEY.format(db=db)
            if control.get(key) == _owner():
                client.flushdb()
                control.delete(key)
        finally:
            client.close()
            control.close()


# --------------------------------------------------------------------------- RabbitMQ


def rabbitmq_test_url() -> str:
    return os.environ.get("SAGAS_TEST_AMQP_URL", DEFAULT_AMQP_URL)


# --------------------------------------------------------------------------- availability


def _tcp_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _postgres_answers() -> bool:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def _redis_answers() -> bool:
    client = _redis_client(0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _rabbitmq_answers() -> bool:
    parts = urlsplit(rabbitmq_test_url())
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    if not _tcp_answers(host, port):
        return False
    # A socket that accepts is not yet a broker that accepts logins (it may be booting).
    from kombu.connection import Connection

    try:
        conn = Connection(rabbitmq_test_url(), connect_timeout=3)  # type: ignore[no-untyped-call]
        with conn:
            conn.ensure_connection(max_retries=1, timeout=3)  # type: ignore[no-untyped-call]
        return True
    except Exception:
        return False


def service_available(kind: ServiceKind) -> bool:
    """Whether the test server of ``kind`` answers right now."""
    if kind in ("postgresql", "postgres"):
        return _postgres_answers()
    if kind == "redis":
        return _redis_answers()
    if kind in ("rabbitmq", "amqp"):
        return _rabbitmq_answers()
    raise ValueError(f"unknown service kind {kind!r}")
