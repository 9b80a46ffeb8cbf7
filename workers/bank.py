"""The bank-transfer saga's participants: debit the source, credit the target, notify.

Each takes a ``StepContext`` whose payload is a transfer (``workers.validation``:
``transfer_id``, ``source``, ``target``, ``amount`` in cents) and returns a JSON dict.

Money moves only by inserting a row into ``account_movements`` under the step's
idempotency key (UNIQUE) and changing the account's balance in the same transaction:
a redelivered step finds its movement and moves nothing twice, and an account's balance
is always its opening balance plus the sum of its movements (``workers.bank_ledger``).

- ``debit_source`` declines with a business error, moving nothing, when the source
  cannot pay (``InsufficientFunds``) or is unknown or frozen (``SourceUnavailable``).
- ``credit_target`` raises ``TargetUnavailable`` (an unexpected failure, not a declared
  business error) when the target is frozen or unknown: the saga compensates, and the
  debit is refunded by a compensating movement.
- A compensation finds what its action wrote by the action's idempotency key and inserts
  the opposite movement (or notice) once, under its own key. When the action wrote
  nothing it leaves a ``void``/``withheld`` row under the action's key, so an action still
  running (a timed-out step) cannot act after its compensation: nothing to undo is
  success.

``transfer["simulate"]`` misbehaves as for orders (``workers.participants.simulate``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from celery_sagas.definition import StepContext, idempotency_key
from celery_sagas.errors import BusinessError
from workers import db
from workers.participants import Result, compensation, forward_action

logger = logging.getLogger(__name__)


class InsufficientFunds(BusinessError):
    """The source account holds less than the amount: nothing was moved."""

    code = "insufficient_funds"


class SourceUnavailable(BusinessError):
    """The source account is unknown or frozen: nothing was moved."""

    code = "source_unavailable"


class TargetUnavailable(RuntimeError):
    """The target account is frozen or unknown. Not a declared business error: the
    credit failed, and the saga compensates the debit."""


def _transfer_id(ctx: StepContext) -> str:
    return str(ctx.payload["transfer_id"])


def _amount(ctx: StepContext) -> int:
    return int(ctx.payload["amount"])


def _lock_account(connection: Connection, account_id: str) -> Row[Any] | None:
    accounts = db.accounts
    return connection.execute(
        sa.select(accounts).where(accounts.c.id == account_id).with_for_update()
    ).one_or_none()


def _change_balance(connection: Connection, account_id: str, amount: int) -> None:
    accounts = db.accounts
    connection.execute(
        sa.update(accounts)
        .where(accounts.c.id == account_id)
        .values(balance=accounts.c.balance + amount)
    )


def _movement_result(row: Row[Any]) -> Result:
    return {"movement_id": row.id, "account": row.account_id, "amount": row.amount}


def _move_once(
    ctx: StepContext,
    account_id: str,
    amount: int,
    kind: str,
    check: Callable[[Row[Any] | None], None],
) -> Result:
    """Insert this step's movement and change the balance, once per idempotency key.

    ``check`` sees the locked account first and raises to refuse: the movement is rolled
    back with it, so a refused step leaves no row.
    """
    values = {
        "transfer_id": _transfer_id(ctx),
        "idempotency_key": ctx.idempotency_key,
        "account_id": account_id,
        "amount": amount,
        "kind": kind,
    }
    with db.get_engine().begin() as connection:
        row, inserted = db.insert_once(connection, db.account_movements, values)
        if inserted:
            check(_lock_account(connection, account_id))
            _change_balance(connection, account_id, amount)
    done = "moved" if inserted else "already moved"
    logger.info("saga %s: %s %s %s on %s", ctx.saga_id, ctx.step, done, row.amount, account_id)
    return _movement_result(row)


def _undo_once(
    ctx: StepContext,
    table: sa.Table,
    placeholder: Mapping[str, Any],
    undo: Callable[[Row[Any]], Mapping[str, Any] | None],
    apply: Callable[[Connection, Row[Any]], None] | None = None,
) -> Result:
    """Undo what the step's action wrote, once, in one transaction.

    Finds the action's row by its idempotency key (or writes ``placeholder`` there, so the
    action can no longer act); ``undo(row)`` gives the values of the undoing row, or
    ``None`` when the action's row did nothing. The undoing row is inserted under the
    compensation's own key, and ``apply`` runs only when this call inserted it.
    """
    action_key = idempotency_key(ctx.saga_id, ctx.step, "action")
    base = {"transfer_id": _transfer_id(ctx)}
    with db.get_engine().begin() as connection:
        original, placed = db.insert_once(
            connection, table, {**base, **placeholder, "idempotency_key": action_key}
        )
        values = None if placed else undo(original)
        if values is None:
            logger.info("saga %s: nothing to undo for %s", ctx.saga_id, ctx.step)
            return {"undone": None if placed else original.id, "already": True}
        row, inserted = db.insert_once(
            connection, table, {**base, **values, "idempotency_key": ctx.idempotency_key}
        )
        if inserted and apply is not None:
            apply(connection, row)
    logger.info("saga %s: undid %s %s with %s", ctx.saga_id, table.name, original.id, row.id)
    return {"undone": original.id, "by": row.id, "already": not inserted}


def _reverse_movement(ctx: StepContext, account_id: str, kind: str) -> Result:
    """The opposite of the step's movement, on the same account, under ``kind``."""

    def opposite(original: Row[Any]) -> Mapping[str, Any] | None:
        if original.amount == 0:  # a void: the action never moved money
            return None
        return {"account_id": original.account_id, "amount": -original.amount, "kind": kind}

    def move(connection: Connection, row: Row[Any]) -> None:
        _change_balance(connection, row.account_id, row.amount)

    void = {"account_id": account_id, "amount": 0, "kind": "void"}
    return _undo_once(ctx, db.account_movements, void, opposite, move)


# --- debit ------------------------------------------------------------------------------


@forward_action
def debit_source(ctx: StepContext) -> Result:
    """Take the amount off the source account, or decline without moving anything."""
    source, amount = str(ctx.payload["source"]), _amount(ctx)

    def can_pay(account: Row[Any] | None) -> None:
        if account is None or account.frozen:
            why = "does not exist" if account is None else "is frozen"
            raise SourceUnavailable(f"source account {source} {why}", account=source)
        if account.balance < amount:
            raise InsufficientFunds(
                f"account {source} holds {account.balance}, the transfer needs {amount}",
                account=source,
                balance=account.balance,
                amount=amount,
            )

    return _move_once(ctx, source, -amount, "debit", can_pay)


@compensation
def refund_source(ctx: StepContext) -> Result:
    """Put the debited amount back on the source account (a ``refund`` movement)."""
    return _reverse_movement(ctx, str(ctx.payload["source"]), "refund")


# --- credit -----------------------------------------------------------------------------


@forward_action
def credit_target(ctx: StepContext) -> Result:
    """Add the amount to the target account; a frozen or unknown target fails the step."""
    target = str(ctx.payload["target"])

    def can_receive(account: Row[Any] | None) -> None:
        if account is None or account.frozen:
            why = "does not exist" if account is None else "is frozen"
            raise TargetUnavailable(f"target account {target} {why}")

    return _move_once(ctx, target, _amount(ctx), "credit", can_receive)


@compensation
def reverse_credit(ctx: StepContext) -> Result:
    """Take the credited amount back off the target account (a ``reversal`` movement)."""
    return _reverse_movement(ctx, str(ctx.payload["target"]), "reversal")


# --- notify -----------------------------------------------------------------------------


@forward_action
def notify(ctx: StepContext) -> Result:
    """Tell both parties the transfer went through (recorded as a notice row)."""
    values = {
        "transfer_id": _transfer_id(ctx),
        "idempotency_key": ctx.idempotency_key,
        "kind": "completed",
    }
    with db.get_engine().begin() as connection:
        row, _ = db.insert_once(connection, db.transfer_notices, values)
    return {"notice_id": row.id, "kind": row.kind}


@compensation
def send_reversal_notice(ctx: StepContext) -> Result:
    """A sent notice cannot be unsent: tell the parties the transfer was reversed."""

    def reversal(original: Row[Any]) -> Mapping[str, Any] | None:
        return {"kind": "reversed"} if original.kind == "completed" else None

    return _undo_once(ctx, db.transfer_notices, {"kind": "withheld"}, reversal)
