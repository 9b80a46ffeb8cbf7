"""Engine creation: one engine per URL per process, SQLite made safe for threads, psycopg 3
over a migration that changed a prepared statement's result type."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from celery_sagas.store import drivers

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _make_sqlite_serialised(engine: Engine) -> None:
    """SQLite: WAL, a long busy timeout, and BEGIN IMMEDIATE so concurrent writers wait
    for each other instead of failing to upgrade a read lock."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _forget_outdated_plans(engine: Engine) -> None:
    """psycopg 3: a statement whose prepared plan a migration outdated (0A000) fails on
    every run in autocommit until its connection forgets its prepared statements; forget
    them at the first failure, so that any statement's next run prepares afresh
    (``Prepared`` runs its statement again at once: ``drivers.retries_changed_plan``)."""

    @event.listens_for(engine, "handle_error")
    def _on_error(context: Any) -> None:
        if context.connection is None:
            return
        if drivers.sqlstate(context.original_exception) != drivers.PLAN_CHANGED:
            return
        if not drivers.forget_prepared(context.connection.connection.driver_connection):
            context.is_disconnect = True  # a psycopg without the cache: a new connection


def build_engine(url: str, **options: Any) -> Engine:
    # statement parameters (payloads: card numbers, addresses) never reach an error text
    options.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        options.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
        engine = create_engine(url, **options)
        _make_sqlite_serialised(engine)
        return engine
    # No pre-ping: it is a round trip per checkout on the hot path. A dropped connection
    # is discarded on its error, which the tasks retry (StoreUnavailableError).
    options.setdefault("pool_pre_ping", False)
    options.setdefault("pool_size", 5)
    options.setdefault("max_overflow", 10)
    engine = create_engine(url, **options)
    if make_url(url).get_driver_name() == drivers.PSYCOPG:
        _forget_outdated_plans(engine)
    return engine


def _key(url: str, options: dict[str, Any]) -> str:
    """The cache key of ``url``'s engine: the URL, and psycopg 3's ``prepare_threshold``
    when set (``prepare=False``: None), so that a store that must not prepare never gets
    the engine another store (or component) made first with the driver's default."""
    connect_args = options.get("connect_args") or {}
    if "prepare_threshold" not in connect_args:
        return url
    return f"{url} prepare_threshold={connect_args['prepare_threshold']}"


def shared_engine(url: str, **options: Any) -> Engine:
    """The process-wide engine for ``url`` (created on first use)."""
    key = _key(url, options)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = build_engine(url, **options)
        return engine


def autocommit_engine(url: str, **options: Any) -> Engine:
    """The process-wide autocommit engine for ``url`` and the same ``options`` as the
    shared one (connect_args, pool sizes…), for single-statement writes: its own pool, so
    no isolation level is set and reset on every checkout."""
    key = f"autocommit {_key(url, options)}"
    with _lock:
        found = _engines.get(key)
        if found is None:
            options = {**options, "isolation_level": "AUTOCOMMIT"}
            found = _engines[key] = build_engine(url, **options)
        return found


def dispose_all_after_fork() -> None:
    """For ``worker_process_init``: drop connections inherited from the parent process."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)


def engine_of(url_or_engine: str | Engine, prepare: bool = True) -> Engine:
    """The process's shared engine for a URL, or the engine given (``prepare=False``: one
    whose driver prepares nothing on the server, for a pooler in transaction mode)."""
    if not isinstance(url_or_engine, str):
        return url_or_engine
    return shared_engine(url_or_engine, **drivers.engine_options(url_or_engine, prepare, {}))
