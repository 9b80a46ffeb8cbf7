"""The bank-transfer participants against real databases (SQLite and PostgreSQL), and the
whole saga through the test kit (``celery_sagas.testing``) on SQLite.

Every movement happens once per idempotency key, a compensation moves the money back
once (and moves nothing when its action never moved any), and after every run the
balances equal the opening balances plus the movements and add up to the start.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from celery_sagas import SagaState
from celery_sagas.definition import StepContext, idempotency_key
from celery_sagas.testing import (
    CrashAfterEffect,
    DeliverTwice,
    Hang,
    SagaHarness,
    assert_compensates_at_every_step,
)
from workers import db
from workers.bank import (
    InsufficientFunds,
    SourceUnavailable,
    TargetUnavailable,
    credit_target,
    debit_source,
    notify,
    refund_source,
    reverse_credit,
    send_reversal_notice,
)
from workers.bank_ledger import balances, check_ledger, movements_of, open_accounts, set_frozen
from workers.participants import SimulatedFailure
from workers.sagas import bank_transfer

OPENING = {"ALICE": 10_000, "BOB": 500, "ICED": 0}
STEPS = [step.name for step in bank_transfer.steps]


@pytest.fixture
def bank(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Fresh participant tables on SQLite with ALICE, BOB and the frozen ICED opened."""
    yield from _bank(sqlite_url, monkeypatch)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_bank(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_database"
    yield from _bank(request.getfixturevalue(fixture), monkeypatch)


def _bank(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("PARTICIPANTS_DATABASE_URL", raising=False)
    monkeypatch.setenv(db.DATABASE_URL_ENV, url)
    db.reset_engine()
    db.create_tables()
    open_accounts(OPENING, frozen={"ICED"})
    yield url
    db.reset_engine()


def transfer(amount: int = 2_500, **changes: Any) -> dict[str, Any]:
    return {
        "transfer_id": f"TR-{uuid.uuid4().hex[:8]}",
        "source": "ALICE",
        "target": "BOB",
        "amount": amount,
        **changes,
    }


def context(
    step: str, payload: dict[str, Any], role: str = "action", saga_id: str = "S1", **extra: Any
) -> StepContext:
    return StepContext(
        saga_id=saga_id,
        saga="bank_transfer",
        step=step,
        payload=payload,
        results={},
        idempotency_key=idempotency_key(saga_id, step, role),
        **extra,
    )


def assert_ledger_holds() -> None:
    check = check_ledger()
    assert check.ok, check
    assert check.total == sum(OPENING.values())


# --- the participants, on SQLite and PostgreSQL ---------------------------------------------


def test_debiting_and_crediting_twice_moves_the_money_once(any_bank: str) -> None:
    payload = transfer()
    debited = debit_source(context("debit_source", payload))
    assert debit_source(context("debit_source", payload)) == debited
    credited = credit_target(context("credit_target", payload))
    assert credit_target(context("credit_target", payload)) == credited
    assert (debited["amount"], credited["amount"]) == (-2_500, 2_500)
    assert balances() == {"ALICE": 7_500, "BOB": 3_000, "ICED": 0}
    assert movements_of(payload["transfer_id"]) == [
        ("debit", "ALICE", -2_500),
        ("credit", "BOB", 2_500),
    ]
    assert_ledger_holds()


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"amount": 10_001}, InsufficientFunds, "ALICE holds 10000, the transfer needs 10001"),
        ({"source": "ICED", "target": "BOB"}, SourceUnavailable, "ICED is frozen"),
        ({"source": "NOBODY"}, SourceUnavailable, "NOBODY does not exist"),
    ],
)
def test_a_debit_that_cannot_pay_declines_and_moves_nothing(
    any_bank: str, changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    payload = transfer(**changes)
    with pytest.raises(error, match=message) as raised:
        debit_source(context("debit_source", payload))
    assert raised.value.code in ("insufficient_funds", "source_unavailable")  # type: ignore[attr-defined]
    assert movements_of(payload["transfer_id"]) == []
    assert balances() == OPENING


def test_a_frozen_target_fails_the_credit_without_moving(any_bank: str) -> None:
    payload = transfer(target="ICED")
    with pytest.raises(TargetUnavailable, match="target account ICED is frozen"):
        credit_target(context("credit_target", payload))
    assert movements_of(payload["transfer_id"]) == []
    set_frozen("ICED", False)
    assert credit_target(context("credit_target", payload))["amount"] == 2_500


def test_refunding_twice_refunds_once(any_bank: str) -> None:
    payload = transfer()
    debited = debit_source(context("debit_source", payload))
    undo = context("debit_source", payload, "compensation", result=debited)
    first = refund_source(undo)
    assert first == {"undone": debited["movement_id"], "by": first["by"], "already": False}
    assert refund_source(undo) == {**first, "already": True}
    assert movements_of(payload["transfer_id"]) == [
        ("debit", "ALICE", -2_500),
        ("refund", "ALICE", 2_500),
    ]
    assert balances()["ALICE"] == 10_000
    assert_ledger_holds()


def test_reversing_a_credit_takes_it_back_once(any_bank: str) -> None:
    payload = transfer()
    credited = credit_target(context("credit_target", payload))
    undo = context("credit_target", payload, "compensation", result=credited)
    assert reverse_credit(undo)["already"] is False
    assert reverse_credit(undo)["already"] is True
    assert balances()["BOB"] == 500
    assert [kind for kind, _, _ in movements_of(payload["transfer_id"])] == ["credit", "reversal"]


def test_a_compensation_before_its_action_leaves_a_void_and_the_late_action_moves_nothing(
    any_bank: str,
) -> None:
    """A timed-out debit is compensated while it may still be running: the refund finds
    nothing to undo, and the debit that arrives afterwards cannot take the money."""
    payload = transfer()
    undo = context("debit_source", payload, "compensation")
    assert refund_source(undo) == {"undone": None, "already": True}
    late = debit_source(context("debit_source", payload))
    assert late["amount"] == 0
    assert refund_source(undo)["already"] is True
    assert movements_of(payload["transfer_id"]) == [("void", "ALICE", 0)]
    assert balances() == OPENING


def test_a_reversal_notice_follows_only_a_sent_notice(any_bank: str) -> None:
    sent, withheld = transfer(), transfer()
    notice = notify(context("notify", sent))
    assert notice["kind"] == "completed"
    reversed_ = send_reversal_notice(context("notify", sent, "compensation", result=notice))
    assert reversed_["undone"] == notice["notice_id"]
    undo = context("notify", withheld, "compensation", saga_id="S2")
    assert send_reversal_notice(undo)["already"] is True
    assert notify(context("notify", withheld, saga_id="S2"))["kind"] == "withheld"  # too late
    with db.get_engine().connect() as connection:
        kinds = connection.execute(
            sa.select(db.transfer_notices.c.transfer_id, db.transfer_notices.c.kind).order_by(
                db.transfer_notices.c.id
            )
        ).all()
    assert [tuple(row) for row in kinds] == [
        (sent["transfer_id"], "completed"),
        (sent["transfer_id"], "reversed"),
        (withheld["transfer_id"], "withheld"),
    ]


def test_the_ledger_check_finds_a_balance_changed_behind_its_back(any_bank: str) -> None:
    assert check_ledger().ok
    with db.get_engine().begin() as connection:
        connection.execute(
            sa.update(db.accounts).where(db.accounts.c.id == "BOB").values(balance=501)
        )
    check = check_ledger()
    assert check.mismatched == ("BOB",)
    assert (check.total, check.opening_total) == (10_501, 10_500)
    assert not check.total_unchanged
    assert check_ledger(accounts=["ALICE", "ICED"]).ok
    with pytest.raises(ValueError, match="not being opened"):
        open_accounts({"CAROL": 1}, frozen={"DAVE"})


# --- the saga through the test kit, on SQLite --------------------------------------------


def compensated(harness: SagaHarness) -> list[str]:
    return [c.step for c in harness.calls if c.role == "compensation" and c.raised is None]


def test_a_transfer_completes_and_moves_the_amount_once(bank: str) -> None:
    harness = SagaHarness(bank_transfer, faults=[DeliverTwice(0), CrashAfterEffect(1)])
    payload = transfer(3_000)
    record = harness.run(payload)
    assert record.state == SagaState.COMPLETED, harness.timeline(record.saga_id)
    assert movements_of(payload["transfer_id"]) == [
        ("debit", "ALICE", -3_000),
        ("credit", "BOB", 3_000),
    ]
    assert balances() == {"ALICE": 7_000, "BOB": 3_500, "ICED": 0}
    assert_ledger_holds()


def test_a_failure_at_every_step_is_compensated_and_the_balances_are_unchanged(
    bank: str,
) -> None:
    records = assert_compensates_at_every_step(bank_transfer, transfer())
    assert len(records) == 2 * len(STEPS)
    assert balances() == OPENING
    assert_ledger_holds()


def test_insufficient_funds_is_declined_and_nothing_is_compensated(bank: str) -> None:
    harness = SagaHarness(bank_transfer)
    payload = transfer(10_001)
    record = harness.run(payload)
    assert record.state == SagaState.FAILED
    assert record.reason is not None and "InsufficientFunds" in record.reason
    assert [s.status.value for s in record.steps] == ["failed", "skipped", "skipped"]
    assert compensated(harness) == []
    assert movements_of(payload["transfer_id"]) == []
    assert_ledger_holds()


def test_a_frozen_target_is_compensated_by_refunding_the_debit(bank: str) -> None:
    harness = SagaHarness(bank_transfer)
    payload = transfer(target="ICED")
    record = harness.run(payload)
    assert record.state == SagaState.FAILED
    assert record.reason is not None and "TargetUnavailable" in record.reason
    assert compensated(harness) == ["credit_target", "debit_source"]
    assert movements_of(payload["transfer_id"]) == [
        ("debit", "ALICE", -2_500),
        ("void", "ICED", 0),
        ("refund", "ALICE", 2_500),
    ]
    assert balances() == OPENING
    assert_ledger_holds()


def test_a_hung_credit_times_out_and_its_late_arrival_moves_nothing(bank: str) -> None:
    harness = SagaHarness(bank_transfer, faults=[Hang("credit_target")])
    payload = transfer()
    record = harness.run(payload)
    assert record.state == SagaState.FAILED
    assert [s.status.value for s in record.steps][:2] == ["compensated", "compensated"]
    late = credit_target(
        StepContext(
            saga_id=record.saga_id,
            saga="bank_transfer",
            step="credit_target",
            payload=payload,
            results={},
            idempotency_key=idempotency_key(record.saga_id, "credit_target", "action"),
        )
    )
    assert late["amount"] == 0
    assert balances() == OPENING
    assert_ledger_holds()


def test_simulate_fails_a_step_as_a_business_error(bank: str) -> None:
    with pytest.raises(SimulatedFailure):
        debit_source(context("debit_source", transfer(simulate={"debit_source": "fail"})))
    assert balances() == OPENING


# --- the demo's checks can fail -----------------------------------------------------------


def test_the_demo_report_finds_a_missing_transfer_and_a_broken_ledger(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_sagas.store import upgrade
    from workers import bank_demo

    monkeypatch.delenv("PARTICIPANTS_DATABASE_URL", raising=False)
    monkeypatch.setenv(db.DATABASE_URL_ENV, sqlite_url)
    db.reset_engine()
    try:
        upgrade(sqlite_url)
        db.create_tables()
        bank_demo.open_demo_accounts()
        planned = bank_demo.make_transfers(5, seed=1)
        assert planned == bank_demo.make_transfers(5, seed=1)  # reproducible
        report = bank_demo.transfer_report(planned)  # no saga was ever started
        broken = sorted(name for name, ok in report["invariants"].items() if not ok)
        assert [name.split(" (")[0] for name in broken] == [
            "bank: each transfer ended as planned",
            "bank: one saga per transfer",
        ]
        with db.get_engine().begin() as connection:
            connection.execute(
                sa.update(db.accounts).where(db.accounts.c.id == "ACC-01").values(balance=1)
            )
        report = bank_demo.transfer_report(planned)
        assert not report["invariants"]["bank: every balance == opening balance + its movements"]
        assert not report["invariants"][
            f"bank: balances sum to the start ({bank_demo.START_TOTAL} cents)"
        ]
    finally:
        db.reset_engine()
