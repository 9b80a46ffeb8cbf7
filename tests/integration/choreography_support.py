"""Shared helpers of the choreography tests: orders, waiting on the saga table, reading the
participants' rows and the saga's timeline."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from tests.support.processes import wait_until

SERVICES = ("inventory", "payment", "shipping", "order")
SETTLED = {"COMPLETED", "FAILED"}


def choreo_order(sku: str, qty: int = 1, **extra: Any) -> dict[str, Any]:
    order: dict[str, Any] = {
        "order_id": f"C-{uuid.uuid4().hex[:12]}",
        "items": [{"sku": sku, "qty": qty, "price": 1250}],
        "payment": {"method": "card", "card_number": "4111111111111111"},
    }
    order.update(extra)
    return order


def saga(saga_id: str) -> Any:
    from celery_sagas.store import SqlSagaStore

    return SqlSagaStore(os.environ["SAGAS_DATABASE_URL"]).load(saga_id)


def wait_state(saga_id: str, states: set[str] = SETTLED, timeout: float = 30) -> Any:
    def reached() -> Any:
        record = saga(saga_id)
        return record if record is not None and record.state.value in states else None

    return wait_until(reached, timeout=timeout, interval=0.1, message=f"saga {saga_id} {states}")


def timeline(saga_id: str) -> list[tuple[str, str | None]]:
    """(event name, publishing handler) in publication order."""
    from celery_sagas.store.tables import events

    engine = sa.create_engine(os.environ["SAGAS_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(events.c.name, events.c.handler)
                .where(events.c.saga_id == saga_id)
                .order_by(events.c.id)
            ).all()
    finally:
        engine.dispose()
    return [(r.name, r.handler) for r in rows]


def reactions(saga_id: str) -> list[tuple[str, str]]:
    """(handler, outcome) of every recorded reaction."""
    from celery_sagas.store.tables import reactions as table

    engine = sa.create_engine(os.environ["SAGAS_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(table.c.handler, table.c.outcome).where(table.c.saga_id == saga_id)
            ).all()
    finally:
        engine.dispose()
    return sorted((r.handler, r.outcome) for r in rows)


def statuses(order_id: str) -> dict[str, list[str]]:
    """The participants' rows of an order: table -> statuses."""
    from workers import db
    from workers.choreography import choreo_orders

    found: dict[str, list[str]] = {}
    with db.get_engine().connect() as conn:
        for table in (db.reservations, db.payments, db.shipments, choreo_orders):
            rows = conn.execute(sa.select(table.c.status).where(table.c.order_id == order_id))
            found[table.name] = sorted(r.status for r in rows)
    return found


def outbox_rows(saga_id: str) -> list[tuple[str, bool]]:
    """(event name, sent) of the services' outbox rows of a saga."""
    from celery_sagas.store.service_outbox import service_outbox
    from workers import db

    with db.get_engine().connect() as conn:
        rows = conn.execute(
            sa.select(service_outbox.c.name, service_outbox.c.sent_at)
            .where(service_outbox.c.saga_id == saga_id)
            .order_by(service_outbox.c.id)
        ).all()
    return [(r.name, r.sent_at is not None) for r in rows]


def stock_of(sku: str) -> int:
    from workers import db

    return db.stock(sku)


def eventually(predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    return wait_until(predicate, timeout=timeout, interval=0.1, message=what)
