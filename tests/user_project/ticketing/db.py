"""The shop's own tables, in the database named by ``SAGAS_DATABASE_URL``."""

from __future__ import annotations

import os
from functools import cache

import sqlalchemy as sa

metadata = sa.MetaData()

seat_holds = sa.Table(
    "seat_hold",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),  # the step's idempotency key
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("seat", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # held | released
)
card_charges = sa.Table(
    "card_charge",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("amount", sa.Numeric(10, 2), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # charged | refunded
)
tickets = sa.Table(
    "ticket",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # issued | void
)


@cache
def engine() -> sa.Engine:
    return sa.create_engine(os.environ["SAGAS_DATABASE_URL"], pool_pre_ping=True)


def dispose() -> None:
    """After a prefork child starts: its own connections, not the parent's."""
    engine().dispose(close=False)


def create_tables() -> None:
    metadata.create_all(engine())


if __name__ == "__main__":
    create_tables()
