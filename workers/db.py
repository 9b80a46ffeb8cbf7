"""The example participants' own database: stock, reservations, payments, shipments, mail,
and the bank-transfer example's accounts, movements and notices.

These tables belong to the services the saga calls, not to the saga store. Every
side-effect table has a UNIQUE ``idempotency_key`` so a redelivered step or compensation
finds the row its first run wrote instead of acting twice.

The engine is created lazily from ``SAGAS_DATABASE_URL`` (or the demo's embedded SQLite
file) with the library's ``build_engine``: on SQLite every transaction starts with
``BEGIN IMMEDIATE``, so concurrent writers queue on the database lock instead of failing.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, Row

from celery_sagas.store.engine import build_engine

DATABASE_URL_ENV = "SAGAS_DATABASE_URL"
SQLITE_BUSY_TIMEOUT_MS = 30_000

participant_metadata = sa.MetaData()


def utc_now() -> datetime:
    return datetime.now(UTC)


def _side_effect_columns() -> list[sa.Column[Any]]:
    """Columns shared by every table that records one side effect of one saga step."""
    return [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("order_id", sa.Text, nullable=False, index=True),
        sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, default=utc_now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, default=utc_now),
    ]


inventory = sa.Table(
    "inventory",
    participant_metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("on_hand", sa.Integer, nullable=False),
)

reservations = sa.Table(
    "reservations",
    participant_metadata,
    *_side_effect_columns(),
    sa.Column("items", sa.JSON, nullable=False),  # [{"sku": str, "qty": int}, ...]
)

payments = sa.Table(
    "payments",
    participant_metadata,
    *_side_effect_columns(),
    sa.Column("amount", sa.BigInteger, nullable=False),  # cents
    sa.Column("method", sa.Text, nullable=False),
)

shipments = sa.Table(
    "shipments",
    participant_metadata,
    *_side_effect_columns(),
    sa.Column("address", sa.Text, nullable=True),  # personal data: never log it
    sa.Column("tracking", sa.Text, nullable=True),
)

notifications = sa.Table(
    "notifications",
    participant_metadata,
    *_side_effect_columns(),
    sa.Column("kind", sa.Text, nullable=False),  # "confirmation" | "cancellation"
)

# what the outcome hooks (``workers.hooks``) record: one row per hook run, on purpose not
# deduplicated, so the tests can count that each saga fired its hook exactly once
order_outcomes = sa.Table(
    "order_outcomes",
    participant_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.Text, nullable=False, index=True),
    sa.Column("saga_id", sa.Text, nullable=False),
    sa.Column("hook", sa.Text, nullable=False),  # "on_completed" | "on_failed"
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, default=utc_now),
)


# --- the bank-transfer example (``workers.bank``) ----------------------------------

accounts = sa.Table(
    "accounts",
    participant_metadata,
    sa.Column("id", sa.Text, primary_key=True),
    # what the account was opened with: balance == opening_balance + its movements, always
    sa.Column("opening_balance", sa.BigInteger, nullable=False),  # cents
    sa.Column("balance", sa.BigInteger, nullable=False),  # cents
    sa.Column("frozen", sa.Boolean, nullable=False, default=False),
)

# append-only: money moves only by inserting a movement (and changing the balance in the
# same transaction); a compensation inserts the opposite movement under its own key
account_movements = sa.Table(
    "account_movements",
    participant_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("transfer_id", sa.Text, nullable=False, index=True),
    sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
    sa.Column("account_id", sa.Text, nullable=False, index=True),
    sa.Column("amount", sa.BigInteger, nullable=False),  # cents, signed; 0 for a void
    sa.Column("kind", sa.Text, nullable=False),  # debit | credit | refund | reversal | void
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, default=utc_now),
)

transfer_notices = sa.Table(
    "transfer_notices",
    participant_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("transfer_id", sa.Text, nullable=False, index=True),
    sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
    sa.Column("kind", sa.Text, nullable=False),  # completed | reversed | withheld
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, default=utc_now),
)


# --- engine -------------------------------------------------------------------

_engine: Engine | None = None
_engine_lock = threading.Lock()


def database_url() -> str:
    from workers import config

    return config.database_url()


def get_engine() -> Engine:
    """The process's engine for ``SAGAS_DATABASE_URL``, created on first use."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = build_engine(database_url())
        return _engine


def dispose_engine() -> None:
    """Drop pooled connections inherited from a parent process (Celery's
    ``worker_process_init``) without closing them under the parent's feet."""
    with _engine_lock:
        if _engine is not None:
            _engine.dispose(close=False)


def reset_engine() -> None:
    """Close the cached engine and forget it; the next ``get_engine()`` rereads the URL."""
    global _engine
    with _engine_lock:
        if _engine is not None:
            _engine.dispose()
        _engine = None


# --- helpers ------------------------------------------------------------------


def dialect_insert(connection: Connection, table: sa.Table) -> Any:
    """An INSERT that supports ``on_conflict_do_nothing``/``_do_update`` on this backend."""
    name = connection.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"the example participants support PostgreSQL and SQLite, not {name}")


def insert_once(
    connection: Connection, table: sa.Table, values: Mapping[str, Any]
) -> tuple[Row[Any], bool]:
    """Insert the row for ``values["idempotency_key"]`` unless it exists.

    Returns the (locked) row and whether this call inserted it.
    """
    key = values["idempotency_key"]
    insert = (
        dialect_insert(connection, table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[table.c.idempotency_key])
        .returning(table.c.id)
    )
    inserted = connection.execute(insert).scalar_one_or_none() is not None
    row = connection.execute(
        sa.select(table).where(table.c.idempotency_key == key).with_for_update()
    ).one()
    return row, inserted


def create_tables(engine: Engine | None = None) -> None:
    """Create the participant tables that do not exist yet."""
    participant_metadata.create_all(engine or get_engine())


def seed_inventory(stock: Mapping[str, int], engine: Engine | None = None) -> None:
    """Set ``on_hand`` for each SKU, inserting the SKUs that are new."""
    if not stock:
        return
    rows = [{"sku": sku, "on_hand": on_hand} for sku, on_hand in stock.items()]
    with (engine or get_engine()).begin() as connection:
        insert = dialect_insert(connection, inventory)
        connection.execute(
            insert.on_conflict_do_update(
                index_elements=[inventory.c.sku], set_={"on_hand": insert.excluded.on_hand}
            ),
            rows,
        )


def stock(sku: str, engine: Engine | None = None) -> int:
    """Units of ``sku`` on hand; ``LookupError`` for an unknown SKU."""
    with (engine or get_engine()).connect() as connection:
        on_hand = connection.execute(
            sa.select(inventory.c.on_hand).where(inventory.c.sku == sku)
        ).scalar_one_or_none()
    if on_hand is None:
        raise LookupError(f"unknown sku {sku!r}")
    return int(on_hand)
