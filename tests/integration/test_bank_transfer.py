"""The bank-transfer saga end to end: real prefork workers, PostgreSQL and Redis.

Each test opens its own accounts, and checks from the participants' tables that every
balance is its opening balance plus its movements and that the balances add up to what
they were opened with.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_sagas.store import SqlSagaStore
from tests.integration.conftest import Deployment, wait_settled
from tests.support.processes import CeleryProcess
from workers import db
from workers.bank_ledger import balances, check_ledger, movements_of, open_accounts

STEPS = ["debit_source", "credit_target", "notify"]
Accounts = Callable[..., list[str]]


@pytest.fixture(scope="module")
def worker(deployment: Deployment) -> Iterator[CeleryProcess]:
    with deployment.worker(name="bank", quick_exit=True) as process:
        yield process


@pytest.fixture
def start_transfer(worker: CeleryProcess) -> Any:
    from workers.bank_transfers import start_transfer

    return start_transfer


@pytest.fixture
def accounts(deployment: Deployment) -> Iterator[Accounts]:
    """``accounts(1000, 0, frozen=[1])``: new accounts with these opening balances (cents);
    after the test, the ledger of every account opened here must hold."""
    opened: list[str] = []

    def open_(*cents: int, frozen: tuple[int, ...] = ()) -> list[str]:
        ids = [f"ACC-{uuid.uuid4().hex[:10]}" for _ in cents]
        open_accounts(dict(zip(ids, cents, strict=True)), frozen={ids[i] for i in frozen})
        opened.extend(ids)
        return ids

    yield open_
    check = check_ledger(accounts=opened)
    assert check.ok, check


def transfer(source: str, target: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {
        "transfer_id": f"TR-{uuid.uuid4().hex[:12]}",
        "source": source,
        "target": target,
        "amount": amount,
        **extra,
    }


def compensated_in_order(saga_id: str) -> list[str]:
    store = SqlSagaStore(db.database_url())
    return [t.step for t in store.transitions(saga_id) if t.new == "compensated"]


def test_a_transfer_moves_the_amount_once_and_notifies(
    start_transfer: Any, accounts: Accounts
) -> None:
    source, target = accounts(10_000, 500)
    payload = transfer(source, target, 2_500)
    start_transfer.delay(payload)
    record = wait_settled([payload["transfer_id"]])[payload["transfer_id"]]
    assert record.state.value == "COMPLETED"
    assert [s.status.value for s in record.steps] == ["completed"] * 3
    assert movements_of(payload["transfer_id"]) == [
        ("debit", source, -2_500),
        ("credit", target, 2_500),
    ]
    assert balances([source, target]) == {source: 7_500, target: 3_000}
    assert record.steps[2].result["kind"] == "completed"


# what the participants' tables hold after a failure injected at each step
MOVEMENTS_AFTER_FAILURE = [
    [],
    [("debit", "S", -700), ("refund", "S", 700)],
    [("debit", "S", -700), ("credit", "T", 700), ("reversal", "T", -700), ("refund", "S", 700)],
]


@pytest.mark.parametrize("failing", range(3), ids=STEPS)
def test_a_failure_at_each_step_compensates_exactly_the_steps_before_it(
    start_transfer: Any, accounts: Accounts, failing: int
) -> None:
    source, target = accounts(1_000, 0)
    payload = transfer(source, target, 700, simulate={STEPS[failing]: "fail"})
    start_transfer.delay(payload)
    record = wait_settled([payload["transfer_id"]])[payload["transfer_id"]]
    assert record.state.value == "FAILED"
    assert STEPS[failing] in record.reason
    statuses = [s.status.value for s in record.steps]
    assert statuses == ["compensated"] * failing + ["failed"] + ["skipped"] * (2 - failing)
    assert compensated_in_order(record.saga_id) == [STEPS[i] for i in reversed(range(failing))]
    names = {"S": source, "T": target}
    assert movements_of(payload["transfer_id"]) == [
        (kind, names[account], cents) for kind, account, cents in MOVEMENTS_AFTER_FAILURE[failing]
    ]
    assert balances([source, target]) == {source: 1_000, target: 0}


def test_insufficient_funds_declines_and_nothing_moves(
    start_transfer: Any, accounts: Accounts
) -> None:
    source, target = accounts(999, 0)
    payload = transfer(source, target, 1_000)
    start_transfer.delay(payload)
    record = wait_settled([payload["transfer_id"]])[payload["transfer_id"]]
    assert record.state.value == "FAILED"
    assert "InsufficientFunds" in record.reason
    assert [s.status.value for s in record.steps] == ["failed", "skipped", "skipped"]
    assert compensated_in_order(record.saga_id) == []
    assert movements_of(payload["transfer_id"]) == []
    assert balances([source, target]) == {source: 999, target: 0}


def test_a_frozen_target_fails_the_credit_and_the_debit_is_refunded(
    start_transfer: Any, accounts: Accounts
) -> None:
    source, frozen = accounts(5_000, 100, frozen=(1,))
    payload = transfer(source, frozen, 1_200)
    start_transfer.delay(payload)
    record = wait_settled([payload["transfer_id"]])[payload["transfer_id"]]
    assert record.state.value == "FAILED"
    assert "TargetUnavailable" in record.reason and "frozen" in record.reason
    assert [s.status.value for s in record.steps] == ["compensated", "compensated", "skipped"]
    # the failed credit may have acted, so it is compensated first: it finds nothing
    assert compensated_in_order(record.saga_id) == ["credit_target", "debit_source"]
    assert movements_of(payload["transfer_id"]) == [
        ("debit", source, -1_200),
        ("void", frozen, 0),
        ("refund", source, 1_200),
    ]
    assert balances([source, frozen]) == {source: 5_000, frozen: 100}


def test_concurrent_transfers_between_few_accounts_keep_the_total(
    start_transfer: Any, accounts: Accounts
) -> None:
    """A mix racing on the same rows: the balances still sum to the start, every
    completed transfer moved its amount once, every failed one moved nothing."""
    ids = accounts(3_000, 3_000, 3_000, 0, frozen=(3,))
    payloads = [transfer(ids[i % 3], ids[(i + 1) % 3], 900 + 100 * (i % 4)) for i in range(9)] + [
        transfer(ids[1], ids[2], 10_000),
        transfer(ids[0], ids[3], 500),
    ]
    for payload in payloads:
        start_transfer.delay(payload)
    records = wait_settled([p["transfer_id"] for p in payloads], timeout=90)
    states = {record.state.value for record in records.values()}
    assert states <= {"COMPLETED", "FAILED"}
    for payload in payloads:
        net: dict[str, int] = {}
        for _, account, cents in movements_of(payload["transfer_id"]):
            net[account] = net.get(account, 0) + cents
        moved = {account: cents for account, cents in net.items() if cents}
        if records[payload["transfer_id"]].state.value == "COMPLETED":
            amount = payload["amount"]
            assert moved == {payload["source"]: -amount, payload["target"]: amount}
        else:
            assert moved == {}
    assert "COMPLETED" in states
    assert "InsufficientFunds" in records[payloads[-2]["transfer_id"]].reason
    assert "TargetUnavailable" in records[payloads[-1]["transfer_id"]].reason
    assert sum(balances(ids).values()) == 9_000
