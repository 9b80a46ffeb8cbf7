"""The bank example's accounts: opening them, and checking the ledger from the rows.

The invariant a transfer saga keeps, whatever fails: every account's balance equals its
opening balance plus the sum of its movements, and the balances add up to what the
accounts were opened with (money moves between accounts, it is never made or lost).
``check_ledger`` reads both from the tables, so tests and the demo check the same thing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from workers import db


def open_accounts(
    opening: Mapping[str, int], frozen: Collection[str] = (), engine: Engine | None = None
) -> None:
    """Open each account with its opening balance (cents); ``frozen`` ones are frozen.

    An account id that exists already is an error: reopening it would rewrite its history.
    """
    unknown = set(frozen) - set(opening)
    if unknown:
        raise ValueError(f"cannot freeze accounts that are not being opened: {sorted(unknown)}")
    rows = [
        {"id": account, "opening_balance": cents, "balance": cents, "frozen": account in frozen}
        for account, cents in opening.items()
    ]
    if rows:
        with (engine or db.get_engine()).begin() as connection:
            connection.execute(sa.insert(db.accounts), rows)


def set_frozen(account_id: str, frozen: bool = True, engine: Engine | None = None) -> None:
    """Freeze (or unfreeze) an account; ``LookupError`` for an unknown one."""
    accounts = db.accounts
    with (engine or db.get_engine()).begin() as connection:
        changed = connection.execute(
            sa.update(accounts).where(accounts.c.id == account_id).values(frozen=frozen)
        ).rowcount
    if not changed:
        raise LookupError(f"unknown account {account_id!r}")


def balances(
    accounts: Collection[str] | None = None, engine: Engine | None = None
) -> dict[str, int]:
    """Balance per account (all accounts, or only ``accounts``), in cents."""
    table = db.accounts
    query = sa.select(table.c.id, table.c.balance).order_by(table.c.id)
    if accounts is not None:
        query = query.where(table.c.id.in_(list(accounts)))
    with (engine or db.get_engine()).connect() as connection:
        return {account: int(balance) for account, balance in connection.execute(query)}


@dataclass(frozen=True)
class LedgerCheck:
    """What ``check_ledger`` found: totals in cents, and the accounts whose balance is not
    their opening balance plus their movements."""

    accounts: int
    opening_total: int
    total: int
    mismatched: tuple[str, ...]

    @property
    def balances_match_movements(self) -> bool:
        return not self.mismatched

    @property
    def total_unchanged(self) -> bool:
        return self.total == self.opening_total

    @property
    def ok(self) -> bool:
        return self.balances_match_movements and self.total_unchanged


def check_ledger(
    accounts: Collection[str] | None = None, engine: Engine | None = None
) -> LedgerCheck:
    """Check the invariant over all accounts (or only ``accounts``: the transfers between
    them must stay among them, as in a test that opened its own)."""
    table, movements = db.accounts, db.account_movements
    moved = (
        sa.select(movements.c.account_id, sa.func.sum(movements.c.amount).label("moved"))
        .group_by(movements.c.account_id)
        .subquery()
    )
    query = sa.select(
        table.c.id,
        table.c.opening_balance,
        table.c.balance,
        sa.func.coalesce(moved.c.moved, 0),
    ).select_from(table.outerjoin(moved, moved.c.account_id == table.c.id))
    if accounts is not None:
        query = query.where(table.c.id.in_(list(accounts)))
    with (engine or db.get_engine()).connect() as connection:
        rows = connection.execute(query).all()
    return LedgerCheck(
        accounts=len(rows),
        opening_total=sum(int(opening) for _, opening, _, _ in rows),
        total=sum(int(balance) for _, _, balance, _ in rows),
        mismatched=tuple(
            sorted(
                account
                for account, opening, balance, moved in rows
                if int(balance) != int(opening) + int(moved)
            )
        ),
    )


def movements_of(transfer_id: str, engine: Engine | None = None) -> list[tuple[str, str, int]]:
    """The transfer's movements in the order they were written: (kind, account, amount)."""
    table = db.account_movements
    query = (
        sa.select(table.c.kind, table.c.account_id, table.c.amount)
        .where(table.c.transfer_id == transfer_id)
        .order_by(table.c.id)
    )
    with (engine or db.get_engine()).connect() as connection:
        return [(kind, account, int(amount)) for kind, account, amount in connection.execute(query)]
