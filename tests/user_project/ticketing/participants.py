"""The saga's steps and compensations. Each acts in one transaction of its own, keyed by
the step's idempotency key, so a redelivery acts once; each compensation undoes only
what is still in the forward state.

Orders choose their fate: ``card: "declined"`` (the card step declines: a business
error), ``fail_ticket: true`` (issuing fails: the steps before are compensated) and
``refund_fails: true`` (the refund keeps failing: the saga is dead-lettered).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from celery_sagas import BusinessError, StepContext
from ticketing.db import card_charges, engine, seat_holds, tickets


class CardDeclined(BusinessError):
    code = "card_declined"


def _record(table: sa.Table, ctx: StepContext, **values: Any) -> None:
    row = {"key": ctx.idempotency_key, "order_id": str(ctx.payload["order_id"]), **values}
    with engine().begin() as conn:
        conn.execute(insert(table).values(row).on_conflict_do_nothing(index_elements=["key"]))


def _undo(table: sa.Table, ctx: StepContext, done: str, undone: str) -> int:
    action_key = f"{ctx.saga_id}:{ctx.step}:action"
    with engine().begin() as conn:
        changed = conn.execute(
            table.update()
            .where(table.c.key == action_key, table.c.status == done)
            .values(status=undone)
        )
    return changed.rowcount


def hold_seat(ctx: StepContext) -> dict[str, str]:
    seat = str(ctx.payload["seat"])
    _record(seat_holds, ctx, seat=seat, status="held")
    return {"seat": seat}


def release_seat(ctx: StepContext) -> dict[str, int]:
    return {"released": _undo(seat_holds, ctx, "held", "released")}


def charge_card(ctx: StepContext) -> dict[str, str]:
    if ctx.payload.get("card") == "declined":
        raise CardDeclined("the card was declined")
    amount = Decimal(str(ctx.payload["amount"]))
    _record(card_charges, ctx, amount=amount, status="charged")
    return {"charged": str(amount)}


def refund_card(ctx: StepContext) -> dict[str, int]:
    if ctx.payload.get("refund_fails"):
        raise RuntimeError("the bank is offline")
    return {"refunded": _undo(card_charges, ctx, "charged", "refunded")}


def issue_ticket(ctx: StepContext) -> dict[str, str]:
    if ctx.payload.get("fail_ticket"):
        raise RuntimeError("the ticket printer is on fire")
    _record(tickets, ctx, status="issued")
    return {"ticket": ctx.idempotency_key}


def void_ticket(ctx: StepContext) -> dict[str, int]:
    return {"voided": _undo(tickets, ctx, "issued", "void")}
