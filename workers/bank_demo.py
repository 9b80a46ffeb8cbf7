"""The demo's bank transfers: the accounts, a reproducible mix of transfers, and what the
demo checks once they settled (read from the saga and participant tables).

The mix: most transfers go through; some ask for more than any account holds
(insufficient funds: declined, nothing moved) and some pay into a frozen account (the
credit fails and the debit is refunded). Whatever happened, every balance is its opening
balance plus its movements and the balances add up to what the accounts opened with.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from celery_sagas.store.tables import sagas
from workers import db
from workers.bank_ledger import check_ledger, open_accounts

SAGA = "bank_transfer"
ACCOUNTS = {f"ACC-{number:02d}": 100_000 for number in range(1, 11)}  # cents
FROZEN = {"ACC-FROZEN-1": 5_000, "ACC-FROZEN-2": 5_000}
TOO_MUCH = 10_000_000  # more than any account holds
START_TOTAL = sum(ACCOUNTS.values()) + sum(FROZEN.values())

COMPLETED = "COMPLETED"
INSUFFICIENT_FUNDS = "InsufficientFunds"
FROZEN_TARGET = "TargetUnavailable"


@dataclass(frozen=True)
class PlannedTransfer:
    payload: dict[str, Any]
    expected: str  # COMPLETED, or the error the saga's reason must name


def open_demo_accounts() -> None:
    open_accounts({**ACCOUNTS, **FROZEN}, frozen=set(FROZEN))


def make_transfers(count: int, seed: int) -> list[PlannedTransfer]:
    """A reproducible mix: ~70% go through, ~15% insufficient funds, ~15% frozen target."""
    rng = random.Random(f"transfers-{seed}")
    planned = []
    for number in range(count):
        source, target = rng.sample(sorted(ACCOUNTS), 2)
        amount, expected = rng.randint(100, 5_000), COMPLETED
        roll = rng.random()
        if roll < 0.15:
            amount, expected = TOO_MUCH, INSUFFICIENT_FUNDS
        elif roll < 0.30:
            target, expected = rng.choice(sorted(FROZEN)), FROZEN_TARGET
        payload = {
            "transfer_id": f"TR-{seed}-{number:05d}",
            "source": source,
            "target": target,
            "amount": amount,
        }
        planned.append(PlannedTransfer(payload, expected))
    return planned


def _outcome(state: str, reason: str | None) -> str:
    if state == COMPLETED:
        return COMPLETED
    for error in (INSUFFICIENT_FUNDS, FROZEN_TARGET):
        if reason and error in reason:
            return error
    return f"{state}: {reason}"


def _net_movements(connection: Any) -> dict[str, dict[str, int]]:
    """Per transfer, the net amount moved per account (zero nets left out)."""
    table = db.account_movements
    net: dict[str, Counter[str]] = {}
    for transfer_id, account, amount in connection.execute(
        sa.select(table.c.transfer_id, table.c.account_id, table.c.amount)
    ):
        net.setdefault(transfer_id, Counter())[account] += int(amount)
    return {key: {a: c for a, c in moved.items() if c} for key, moved in net.items()}


def _moved_as_settled(payload: Mapping[str, Any], state: str, moved: Mapping[str, int]) -> bool:
    """COMPLETED: the amount left the source and reached the target, once. FAILED:
    nothing moved at all (refunds and reversals cancelled what had)."""
    if state != COMPLETED:
        return not moved
    amount = int(payload["amount"])
    return dict(moved) == {payload["source"]: -amount, payload["target"]: amount}


def transfer_report(planned: Sequence[PlannedTransfer]) -> dict[str, Any]:
    """The transfers' summary and invariants."""
    with db.get_engine().connect() as connection:
        rows = connection.execute(
            sa.select(sagas.c.business_key, sagas.c.state, sagas.c.reason).where(
                sagas.c.name == SAGA
            )
        ).all()
        net = _net_movements(connection)
    settled = {key: (state, reason) for key, state, reason in rows}
    outcome = {
        key: _outcome(*settled.get(key, ("missing", None)))
        for key in (p.payload["transfer_id"] for p in planned)
    }
    ledger = check_ledger()
    wanted = Counter(p.expected for p in planned)
    as_planned = (
        f"bank: each transfer ended as planned ({wanted[COMPLETED]} ok, "
        f"{wanted[INSUFFICIENT_FUNDS]} insufficient funds, {wanted[FROZEN_TARGET]} frozen target)"
    )
    moved_right = all(
        _moved_as_settled(p.payload, outcome[key], net.get(key, {}))
        for p in planned
        if (key := p.payload["transfer_id"]) in settled
    )
    invariants = {
        f"bank: one saga per transfer ({len(planned)} transfers, {len(rows)} sagas)": (
            len(rows) == len(planned)
        ),
        as_planned: all(outcome[p.payload["transfer_id"]] == p.expected for p in planned),
        "bank: completed transfers moved the amount once, failed ones nothing": moved_right,
        "bank: every balance == opening balance + its movements": ledger.balances_match_movements,
        f"bank: balances sum to the start ({START_TOTAL} cents)": (
            ledger.total_unchanged and ledger.total == START_TOTAL
        ),
    }
    return {
        "total": len(rows),
        "states": dict(Counter(state for _, state, _ in rows)),
        "outcomes": dict(Counter(outcome.values())),
        "opening_total": ledger.opening_total,
        "balance_total": ledger.total,
        "invariants": invariants,
    }


def transfer_summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The demo's "bank transfers" section, one line each."""
    labels = {
        COMPLETED: "completed",
        INSUFFICIENT_FUNDS: "declined: insufficient funds (nothing moved)",
        FROZEN_TARGET: "frozen target: credit failed, debit refunded",
    }
    lines = [
        f"  {labels.get(outcome, outcome):<50}{count:>12}"
        for outcome, count in sorted(report["outcomes"].items())
    ]
    totals = f"{report['opening_total']} -> {report['balance_total']}"
    lines.append(f"  {'balances, opening total -> now (cents)':<50}{totals:>12}")
    return lines
