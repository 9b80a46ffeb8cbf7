"""The order choreography: no coordinator, each service reacts to the previous event.

    OrderCreated → inventory reserves → InventoryReserved → payment charges →
    PaymentProcessed → shipping creates the shipment → ShipmentCreated → the order
    service publishes OrderFulfilled.

    PaymentFailed (declined card) → inventory releases → InventoryReleased → OrderFailed
    ShipmentFailed → payment refunds → PaymentRefunded → inventory releases → OrderFailed
    OrderTimedOut (the deadline) → payment refunds (if it charged) → inventory releases
    (if it reserved) → OrderFailed; shipping cancels the shipment (if it shipped)
    InventoryFailed (no stock) → OrderFailed

A compensation that finds nothing to undo leaves a ``void`` row under the forward
handler's key, so a forward event that arrives after it (its service was away past the
deadline) acts no more.

Every handler works in its service's transaction (``tx``) on the participants' tables
(inventory, reservations, payments, shipments of ``workers.db``, and ``choreo_orders``
here); what it publishes leaves only if that transaction commits.

``order["simulate"]`` makes services misbehave for demos and tests:
``{"shipping": "fail"}`` (a business failure: ShipmentFailed), ``{"payment": "stall"}``
(payment swallows the event: the saga stalls until its deadline) and
``{"faults": {"shipping.create": 2}}`` (the handler publishes, then raises an unexpected
error that many times: rolled back, retried, dead-lettered).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import Connection

from celery_sagas import BusinessError, Choreography, RetryPolicy, choreography_subscriber
from celery_sagas.integration.choreography import ChoreographySubscriber
from celery_sagas.integration.reactions import Event
from celery_sagas.store.service_outbox import create_service_tables
from workers import config, db
from workers.participants import (
    DECLINED_CARD,
    InsufficientInventory,
    PaymentDeclined,
    order_total,
    quantities_by_sku,
)

ORDER_CHOREOGRAPHY = "order_choreography"
DEADLINE_ENV = "SAGAS_CHOREOGRAPHY_DEADLINE"  # seconds; default 300

choreo_orders = sa.Table(
    "choreo_orders",
    db.participant_metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column("saga_id", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),  # fulfilled | failed
    sa.Column("reason", sa.Text),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
)

# simulated unexpected failures left per (order, handler); written outside the handler's
# transaction, so the count survives its rollback
choreo_faults = sa.Table(
    "choreo_faults",
    db.participant_metadata,
    sa.Column("order_id", sa.Text, primary_key=True),
    sa.Column("handler", sa.Text, primary_key=True),
    sa.Column("remaining", sa.Integer, nullable=False),
)

order_choreography = Choreography(
    ORDER_CHOREOGRAPHY,
    start="OrderCreated",
    events={
        "InventoryReserved",
        "PaymentProcessed",
        "ShipmentCreated",
        "InventoryReleased",
        "PaymentRefunded",
    },
    compensating={"PaymentFailed", "ShipmentFailed", "OrderTimedOut", "InventoryFailed"},
    succeeded="OrderFulfilled",
    failed="OrderFailed",
    deadline=timedelta(seconds=float(os.environ.get(DEADLINE_ENV, "300"))),
    on_deadline="OrderTimedOut",
    business_key="order_id",
    retry=RetryPolicy(max_retries=2, backoff_base=0.2, backoff_cap=1.0),
)

FAILURE_REASONS = {
    "PaymentFailed": "Payment failed",
    "ShipmentFailed": "Shipment failed",
    "OrderTimedOut": "Order timed out",
    "InventoryFailed": "Out of stock",
}


class ShipmentRefused(BusinessError):
    """The carrier refused the shipment (``simulate: {"shipping": "fail"}``)."""

    code = "shipment_refused"


class SimulatedCrash(RuntimeError):
    """An unexpected failure (``simulate: {"faults": {handler: n}}``)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _plan(event: Event) -> Mapping[str, Any]:
    return event.data.get("simulate") or {}


def _crash_if_planned(event: Event, handler: str) -> None:
    """Fail as many times as the order's fault plan says (counted outside ``tx``)."""
    if not (_plan(event).get("faults") or {}).get(handler):
        return
    with db.get_engine().begin() as conn:
        left = conn.execute(
            sa.update(choreo_faults)
            .where(
                choreo_faults.c.order_id == event.data["order_id"],
                choreo_faults.c.handler == handler,
                choreo_faults.c.remaining > 0,
            )
            .values(remaining=choreo_faults.c.remaining - 1)
        ).rowcount
    if left:
        raise SimulatedCrash(f"simulated crash of {handler} for {event.data['order_id']}")


def _key(event: Event, what: str) -> str:
    return f"choreo:{event.saga_id}:{what}"


def _row(tx: Connection, table: sa.Table, event: Event, what: str) -> Any:
    return tx.execute(
        sa.select(table).where(table.c.idempotency_key == _key(event, what)).with_for_update()
    ).one_or_none()


def _set_status(tx: Connection, table: sa.Table, row_id: int, status: str) -> None:
    tx.execute(
        sa.update(table).where(table.c.id == row_id).values(status=status, updated_at=_now())
    )


def _change_stock(tx: Connection, items: Any, sign: int) -> None:
    wanted = quantities_by_sku(items)
    rows = tx.execute(
        sa.select(db.inventory.c.sku, db.inventory.c.on_hand)
        .where(db.inventory.c.sku.in_(list(wanted)))
        .order_by(db.inventory.c.sku)
        .with_for_update()
    ).all()
    on_hand = {sku: n for sku, n in rows}
    short = {sku: qty for sku, qty in wanted.items() if sign < 0 and on_hand.get(sku, 0) < qty}
    if short:
        raise InsufficientInventory(f"not enough stock for {sorted(short)}", short=sorted(short))
    for sku, qty in wanted.items():
        tx.execute(
            sa.update(db.inventory)
            .where(db.inventory.c.sku == sku)
            .values(on_hand=db.inventory.c.on_hand + sign * qty)
        )


def _failure(event: Event, default: str) -> dict[str, Any]:
    """The data passed on along a compensation: which failure started it."""
    return {**event.data, "failure": event.data.get("failure", default)}


# -- handlers -----------------------------------------------------------------------


def _insert_once(tx: Connection, table: sa.Table, event: Event, what: str, **values: Any) -> Any:
    """Insert the order's ``what`` row under its key; its id, or None if a row is there
    already (a compensation's ``void`` placeholder: the order was compensated before this
    late event came, so the handler must not act)."""
    return tx.execute(
        db.dialect_insert(tx, table)
        .values(order_id=event.data["order_id"], idempotency_key=_key(event, what), **values)
        .on_conflict_do_nothing(index_elements=[table.c.idempotency_key])
        .returning(table.c.id)
    ).scalar_one_or_none()


def _void_if_missing(
    tx: Connection, table: sa.Table, event: Event, what: str, **values: Any
) -> Any:
    """The order's ``what`` row, locked; a ``void`` placeholder is left in its place when
    the forward handler has not acted (yet), so a late one cannot act after this."""
    _insert_once(tx, table, event, what, status="void", **values)
    return _row(tx, table, event, what)


def reserve(event: Event, tx: Connection) -> None:
    items = [{"sku": i["sku"], "qty": i["qty"]} for i in event.data["items"]]
    row_id = _insert_once(tx, db.reservations, event, "reservation", status="reserved", items=items)
    if row_id is None:
        return  # released before it came (the order timed out): reserve nothing
    _change_stock(tx, items, -1)  # no stock: rolls the reservation back with it
    event.publish("InventoryReserved", {**event.data, "reservation_id": row_id})


def release(event: Event, tx: Connection) -> None:
    """Put a reservation back (nothing to do if there is none)."""
    row = _void_if_missing(tx, db.reservations, event, "reservation", items=[])
    if row.status == "reserved":
        _change_stock(tx, row.items, +1)
        _set_status(tx, db.reservations, row.id, "released")
    event.publish("InventoryReleased", _failure(event, event.name))


def charge(event: Event, tx: Connection) -> None:
    if _plan(event).get("payment") == "stall":
        return  # swallowed: the saga waits for its deadline
    method = str(event.data["payment"]["method"])
    if method == DECLINED_CARD:
        raise PaymentDeclined(f"payment declined for order {event.data['order_id']}")
    amount = order_total(event.data)
    row_id = _insert_once(
        tx, db.payments, event, "payment", status="captured", amount=amount, method=method
    )
    if row_id is None:
        return  # refunded before it came (the order timed out): charge nothing
    event.publish("PaymentProcessed", {**event.data, "payment_id": row_id})


def refund(event: Event, tx: Connection) -> None:
    """Refund a captured payment (nothing to do if there is none)."""
    row = _void_if_missing(tx, db.payments, event, "payment", amount=0, method="none")
    if row.status == "captured":
        _set_status(tx, db.payments, row.id, "refunded")
    event.publish("PaymentRefunded", _failure(event, event.name))


def create_shipment(event: Event, tx: Connection) -> None:
    tracking = f"TRK-{event.data['order_id']}"
    if (
        _insert_once(tx, db.shipments, event, "shipment", status="created", tracking=tracking)
        is None
    ):
        return  # cancelled before it came (the order timed out): ship nothing
    event.publish("ShipmentCreated", {**event.data, "tracking": tracking})
    _crash_if_planned(event, "shipping.create_shipment")  # after publishing: rolled back
    if _plan(event).get("shipping") == "fail":
        raise ShipmentRefused(f"carrier refused order {event.data['order_id']}")


def cancel_shipment(event: Event, tx: Connection) -> None:
    """The order timed out: cancel its shipment, or leave a void one in its place so a
    PaymentProcessed still on its way (shipping was away) ships nothing."""
    row = _void_if_missing(tx, db.shipments, event, "shipment")
    if row.status == "created":
        _set_status(tx, db.shipments, row.id, "cancelled")


def _close_order(event: Event, tx: Connection, status: str, reason: str | None) -> None:
    tx.execute(
        db.dialect_insert(tx, choreo_orders)
        .values(
            order_id=event.data["order_id"],
            saga_id=event.saga_id,
            status=status,
            reason=reason,
            at=_now(),
        )
        .on_conflict_do_nothing()
    )


def fulfil(event: Event, tx: Connection) -> None:
    _close_order(event, tx, "fulfilled", None)
    event.publish(
        "OrderFulfilled",
        {"order_id": event.data["order_id"], "tracking": event.data.get("tracking")},
    )


def fail(event: Event, tx: Connection) -> None:
    failure = str(event.data.get("failure") or event.name)
    reason = FAILURE_REASONS.get(failure, failure)
    _close_order(event, tx, "failed", reason)
    event.publish("OrderFailed", {"order_id": event.data["order_id"], "reason": reason})


def register(app: Celery) -> ChoreographySubscriber:
    """Subscribe the order choreography's handlers on ``app`` (services share the
    participants' database here; ``service_databases`` would give each its own)."""
    url = db.database_url()
    on = choreography_subscriber(
        app,
        order_choreography,
        database_url=config.saga_database_url() or url,
        service_databases={s: url for s in ("inventory", "payment", "shipping", "order")},
    )
    on("OrderCreated", service="inventory", on_business_error="InventoryFailed")(reserve)
    on("PaymentFailed", service="inventory")(release)
    on("PaymentRefunded", service="inventory")(_named(release, "release_after_refund"))
    on("InventoryReserved", service="payment", on_business_error="PaymentFailed")(charge)
    on("ShipmentFailed", service="payment")(refund)
    on("OrderTimedOut", service="payment")(_named(refund, "refund_on_timeout"))
    on("PaymentProcessed", service="shipping", on_business_error="ShipmentFailed")(create_shipment)
    on("OrderTimedOut", service="shipping")(cancel_shipment)
    on("ShipmentCreated", service="order")(fulfil)
    on("InventoryReleased", service="order")(fail)
    on("InventoryFailed", service="order")(_named(fail, "reject"))
    return on


def _named(function: Any, name: str) -> Any:
    """The same handler under another name (one task per subscribed event)."""

    def handler(event: Event, tx: Connection) -> None:
        function(event, tx)

    handler.__name__ = handler.__qualname__ = name
    handler.__doc__ = function.__doc__
    return handler


SERVICE_QUEUES = ("inventory", "payment", "shipping", "order")


def create_tables() -> None:
    """The participants' tables (these included) and the services' guard and outbox."""
    db.create_tables()
    create_service_tables(db.get_engine())


def seed_faults(order: Mapping[str, Any]) -> None:
    faults = ((order.get("simulate") or {}).get("faults") or {}).items()
    if not faults:
        return
    with db.get_engine().begin() as conn:
        for handler, count in faults:
            conn.execute(
                sa.insert(choreo_faults).values(
                    order_id=order["order_id"], handler=handler, remaining=int(count)
                )
            )


def start_order(
    on: ChoreographySubscriber, order: Mapping[str, Any], deadline: timedelta | None = None
) -> str:
    """Start the choreography for ``order`` (its fault plan seeded first)."""
    seed_faults(order)
    return on.start(order, deadline=deadline)
