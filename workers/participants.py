"""The example participants of the order-fulfillment saga: four actions, four compensations.

Each function takes a ``StepContext`` and returns a JSON-serialisable dict.

Forward actions are idempotent through ``ctx.idempotency_key``: in one transaction they
insert their row with ``ON CONFLICT DO NOTHING`` and act (take stock, capture, ...) only if
this call inserted it; a redelivery finds the row and returns the same result.

Compensations find the row to undo from ``ctx.result`` (the step's original result) and
undo it only while it still has the forward status, so running one twice undoes once.
When the step has no result (it timed out, or failed with an unknown outcome) they look
the row up by the action's idempotency key instead; if the action has not written it
yet, they write it themselves, already undone, so an action that is still running
cannot act after its compensation.

``order["simulate"]`` makes a function misbehave for demos and tests; see ``simulate``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from celery_sagas.definition import StepContext, idempotency_key
from celery_sagas.errors import BusinessError, TransientError
from workers import db
from workers.validation import parse_simulation

logger = logging.getLogger(__name__)

Result = dict[str, Any]
Participant = Callable[[StepContext], Result]

DECLINED_CARD = "card_declined"
DEFAULT_HANG_SECONDS = 3600.0


class InsufficientInventory(BusinessError):
    """Not enough stock for the order: nothing was reserved."""

    code = "insufficient_inventory"


class PaymentDeclined(BusinessError):
    """The payment method was declined: nothing was captured."""

    code = "payment_declined"


class SimulatedFailure(BusinessError):
    """``simulate: fail`` on a forward action: it declined without acting."""

    code = "simulated_failure"


# --- simulation -----------------------------------------------------------------


def simulate(ctx: StepContext, function_name: str, *, compensation: bool) -> None:
    """Misbehave as ``ctx.payload["simulate"]`` asks, before any side effect.

    ``fail``: a forward action raises ``SimulatedFailure`` (declined, did not act), a
    compensation raises ``RuntimeError``. ``transient:N``: ``TransientError`` while
    ``ctx.attempt <= N``. ``hang``: sleep ``hang_seconds`` (default one hour), then act.
    ``stubborn``: as ``hang``, swallowing the soft time limit. ``deaf``: as ``hang``,
    swallowing every interrupt (a call stuck in C code: only a kill stops it). ``slow:S``:
    sleep S seconds, then act. Forward actions also answer to their step name.
    """
    plan: Mapping[str, str] = ctx.payload.get("simulate") or {}
    names = (function_name,) if compensation else (function_name, ctx.step)
    behaviour = next((plan[name] for name in names if name in plan), None)
    if behaviour is None:
        return
    kind, argument = parse_simulation(behaviour)
    if kind == "fail":
        if compensation:
            raise RuntimeError("simulated compensation failure")
        raise SimulatedFailure(f"simulated failure of {function_name}", function=function_name)
    if kind == "transient" and ctx.attempt <= argument:
        raise TransientError(
            f"simulated transient failure of {function_name} "
            f"(attempt {ctx.attempt}, failing up to {int(argument)})"
        )
    if kind == "hang":
        time.sleep(float(ctx.payload.get("hang_seconds", DEFAULT_HANG_SECONDS)))
    elif kind == "stubborn":  # ignores its soft time limit: only the hard limit stops it
        _sleep_through_interrupts(float(ctx.payload.get("hang_seconds", DEFAULT_HANG_SECONDS)))
    elif kind == "deaf":
        _sleep_through_interrupts(
            float(ctx.payload.get("hang_seconds", DEFAULT_HANG_SECONDS)), BaseException
        )
    elif kind == "slow":
        time.sleep(argument)


def _sleep_through_interrupts(seconds: float, swallowed: type[BaseException] = Exception) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            time.sleep(max(0.0, until - time.monotonic()))
        except swallowed:  # swallowing the soft time limit (deaf: any interrupt) is the point
            continue


def _participant(*, compensation: bool) -> Callable[[Participant], Participant]:
    def decorate(function: Participant) -> Participant:
        @functools.wraps(function)
        def run(ctx: StepContext) -> Result:
            simulate(ctx, function.__name__, compensation=compensation)
            return function(ctx)

        return run

    return decorate


forward_action = _participant(compensation=False)
compensation = _participant(compensation=True)


# --- shared building blocks -------------------------------------------------------


def _order_id(ctx: StepContext) -> str:
    return str(ctx.payload["order_id"])


def _act_once(
    ctx: StepContext,
    table: sa.Table,
    values: Mapping[str, Any],
    act: Callable[[Connection, Row[Any]], None] | None = None,
) -> tuple[Row[Any], bool]:
    """Write this action's row and run ``act`` once per idempotency key, atomically.

    Returns the row and whether this call wrote it (``False``: an earlier call did).
    """
    with db.get_engine().begin() as connection:
        row, inserted = db.insert_once(
            connection,
            table,
            {"order_id": _order_id(ctx), "idempotency_key": ctx.idempotency_key, **values},
        )
        if inserted and act is not None:
            act(connection, row)
    if inserted:
        logger.info("saga %s: %s wrote %s %s", ctx.saga_id, ctx.step, table.name, row.id)
    else:
        logger.info("saga %s: %s already wrote %s %s", ctx.saga_id, ctx.step, table.name, row.id)
    return row, inserted


@dataclass(frozen=True)
class Undo:
    """How to undo one kind of row: its table, where its id is in the step's result, and
    the status the action leaves it in versus the one the compensation moves it to."""

    table: sa.Table
    id_field: str
    done: str
    undone: str


RESERVATION = Undo(db.reservations, "reservation_id", done="reserved", undone="released")
PAYMENT = Undo(db.payments, "payment_id", done="captured", undone="refunded")
SHIPMENT = Undo(db.shipments, "shipment_id", done="created", undone="cancelled")


def _original_id(ctx: StepContext, id_field: str) -> int | None:
    """The id in the step's result; ``None`` if the step has no result."""
    if ctx.result is None:
        return None
    if not isinstance(ctx.result, Mapping) or id_field not in ctx.result:
        found = sorted(ctx.result) if isinstance(ctx.result, Mapping) else type(ctx.result).__name__
        raise ValueError(
            f"cannot compensate step {ctx.step} of saga {ctx.saga_id}: its result has no "
            f"{id_field!r} (found {found})"
        )
    return int(ctx.result[id_field])


def _row_to_undo(
    connection: Connection,
    ctx: StepContext,
    undo: Undo,
    original_id: int | None,
    placeholder: Mapping[str, Any],
) -> Row[Any] | None:
    """Lock the row the action wrote; ``None`` if there is nothing to undo."""
    table = undo.table
    if original_id is not None:
        return connection.execute(
            sa.select(table).where(table.c.id == original_id).with_for_update()
        ).one_or_none()
    row, inserted = db.insert_once(
        connection,
        table,
        {
            "order_id": _order_id(ctx),
            "idempotency_key": idempotency_key(ctx.saga_id, ctx.step, "action"),
            "status": undo.undone,
            **placeholder,
        },
    )
    return None if inserted else row


def _compensate(
    ctx: StepContext,
    undo: Undo,
    placeholder: Mapping[str, Any],
    restore: Callable[[Connection, Row[Any]], None] | None = None,
) -> Result:
    """Move the action's row from ``undo.done`` to ``undo.undone`` (and ``restore``) once.

    ``placeholder`` fills the own columns of the already-undone row written when the
    step has no result and its action has not written anything yet.
    """
    original_id = _original_id(ctx, undo.id_field)
    with db.get_engine().begin() as connection:
        row = _row_to_undo(connection, ctx, undo, original_id, placeholder)
        undone_id = row.id if row is not None else original_id
        if row is None or row.status != undo.done:
            logger.info("saga %s: nothing to undo for %s", ctx.saga_id, ctx.step)
            return {"undone": undone_id, "already": True}
        connection.execute(
            sa.update(undo.table)
            .where(undo.table.c.id == row.id)
            .values(status=undo.undone, updated_at=db.utc_now())
        )
        if restore is not None:
            restore(connection, row)
    logger.info("saga %s: %s %s %s", ctx.saga_id, undo.undone, undo.table.name, row.id)
    return {"undone": undone_id, "already": False}


# --- inventory ------------------------------------------------------------------------


def quantities_by_sku(items: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Total quantity per SKU, sorted by SKU (the order stock rows are locked in)."""
    totals: dict[str, int] = {}
    for item in items:
        totals[item["sku"]] = totals.get(item["sku"], 0) + int(item["qty"])
    return dict(sorted(totals.items()))


def _lock_stock(connection: Connection, skus: Iterable[str]) -> dict[str, int]:
    inventory = db.inventory
    rows = connection.execute(
        sa.select(inventory.c.sku, inventory.c.on_hand)
        .where(inventory.c.sku.in_(list(skus)))
        .order_by(inventory.c.sku)
        .with_for_update()
    ).all()
    return {sku: on_hand for sku, on_hand in rows}


def _change_stock(connection: Connection, wanted: Mapping[str, int], sign: int) -> None:
    inventory = db.inventory
    for sku, qty in wanted.items():
        connection.execute(
            sa.update(inventory)
            .where(inventory.c.sku == sku)
            .values(on_hand=inventory.c.on_hand + sign * qty)
        )


def _take_stock(connection: Connection, reservation: Row[Any]) -> None:
    wanted = quantities_by_sku(reservation.items)
    on_hand = _lock_stock(connection, wanted)
    short = {sku: qty for sku, qty in wanted.items() if on_hand.get(sku, 0) < qty}
    if short:
        detail = ", ".join(
            f"{sku}: want {qty}, have {on_hand.get(sku, 0)}" for sku, qty in short.items()
        )
        raise InsufficientInventory(
            f"not enough stock for order {reservation.order_id} ({detail})",
            order_id=reservation.order_id,
            short=sorted(short),
        )
    _change_stock(connection, wanted, -1)


def _return_stock(connection: Connection, reservation: Row[Any]) -> None:
    _change_stock(connection, quantities_by_sku(reservation.items), +1)


@forward_action
def reserve_inventory(ctx: StepContext) -> Result:
    """Take every item's quantity off the shelf, or raise ``InsufficientInventory``."""
    items = [{"sku": item["sku"], "qty": item["qty"]} for item in ctx.payload["items"]]
    row, _ = _act_once(ctx, db.reservations, {"status": "reserved", "items": items}, _take_stock)
    return {"reservation_id": row.id, "items": row.items}


@compensation
def release_inventory(ctx: StepContext) -> Result:
    """Put the reserved quantities back on the shelf."""
    return _compensate(ctx, RESERVATION, {"items": []}, restore=_return_stock)


# --- payment ----------------------------------------------------------------------------


def order_total(order: Mapping[str, Any]) -> int:
    """The order's total in cents."""
    return sum(int(item["qty"]) * int(item["price"]) for item in order["items"])


def _payment_method(ctx: StepContext) -> str:
    return str(ctx.payload["payment"]["method"])


@forward_action
def process_payment(ctx: StepContext) -> Result:
    """Capture the order total, or raise ``PaymentDeclined`` for a declined card."""
    method = _payment_method(ctx)
    if method == DECLINED_CARD:
        raise PaymentDeclined(f"payment declined for order {_order_id(ctx)}", method=method)
    values = {"status": "captured", "amount": order_total(ctx.payload), "method": method}
    row, _ = _act_once(ctx, db.payments, values)
    return {"payment_id": row.id, "amount": row.amount}


@compensation
def refund_payment(ctx: StepContext) -> Result:
    """Refund the captured payment."""
    return _compensate(ctx, PAYMENT, {"amount": 0, "method": _payment_method(ctx)})


# --- shipment ---------------------------------------------------------------------------


@forward_action
def create_shipment(ctx: StepContext) -> Result:
    """Book a shipment to the order's address."""
    values = {
        "status": "created",
        "address": ctx.payload.get("address"),
        "tracking": f"TRK-{_order_id(ctx)}",
    }
    row, _ = _act_once(ctx, db.shipments, values)
    return {"shipment_id": row.id, "tracking": row.tracking}


@compensation
def cancel_shipment(ctx: StepContext) -> Result:
    """Cancel the booked shipment."""
    return _compensate(ctx, SHIPMENT, {"address": None, "tracking": None})


# --- notifications ----------------------------------------------------------------------


@forward_action
def send_confirmation(ctx: StepContext) -> Result:
    """Send the order confirmation (recorded as a notification row)."""
    row, _ = _act_once(ctx, db.notifications, {"status": "sent", "kind": "confirmation"})
    return {"notification_id": row.id}


@compensation
def send_cancellation_notice(ctx: StepContext) -> Result:
    """A sent mail cannot be unsent: tell the customer the order was cancelled instead."""
    original_id = _original_id(ctx, "notification_id")
    _, inserted = _act_once(ctx, db.notifications, {"status": "sent", "kind": "cancellation"})
    return {"undone": original_id, "already": not inserted}
