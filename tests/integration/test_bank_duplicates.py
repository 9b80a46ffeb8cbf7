"""The bank-transfer saga with every message delivered twice (``duplicating_app``): no
movement happens twice, and the balances still add up to the start."""

from __future__ import annotations

import uuid

import redis

from tests.integration.conftest import Deployment, wait_settled
from workers.bank_ledger import balances, check_ledger, movements_of, open_accounts


def test_every_message_delivered_twice_moves_each_amount_once(deployment: Deployment) -> None:
    from tests.integration import duplicating_app
    from workers.bank_transfers import start_transfer

    source, target, frozen = (f"ACC-{uuid.uuid4().hex[:10]}" for _ in range(3))
    open_accounts({source: 10_000, target: 0, frozen: 0}, frozen={frozen})
    ok = [
        {
            "transfer_id": f"TR-{uuid.uuid4().hex[:12]}",
            "source": source,
            "target": target,
            "amount": 1_000,
        }
        for _ in range(3)
    ]
    refused = {
        "transfer_id": f"TR-{uuid.uuid4().hex[:12]}",
        "source": source,
        "target": frozen,
        "amount": 2_000,
    }
    counter = redis.Redis.from_url(deployment.broker_url)
    counter.delete(duplicating_app.DUPLICATES_KEY)
    duplicating_app.enable()  # the first steps published from this process are doubled too
    try:
        with deployment.worker(
            "tests.integration.duplicating_app", name="bank-dup", quick_exit=True
        ) as worker:
            for payload in [*ok, refused]:
                start_transfer.delay(payload)
            records = wait_settled([p["transfer_id"] for p in [*ok, refused]])
            log = worker.log_text()
    finally:
        duplicating_app.disable()

    # 4 sagas x at least 3 step or compensation messages each were all doubled
    assert int(counter.get(duplicating_app.DUPLICATES_KEY) or 0) >= 4 * 3
    assert "message ignored (stale" in log
    for payload in ok:
        assert records[payload["transfer_id"]].state.value == "COMPLETED"
        assert movements_of(payload["transfer_id"]) == [
            ("debit", source, -1_000),
            ("credit", target, 1_000),
        ]
    assert records[refused["transfer_id"]].state.value == "FAILED"
    assert movements_of(refused["transfer_id"]) == [
        ("debit", source, -2_000),
        ("void", frozen, 0),
        ("refund", source, 2_000),
    ]
    assert balances([source, target, frozen]) == {source: 7_000, target: 3_000, frozen: 0}
    check = check_ledger(accounts=[source, target, frozen])
    assert check.ok, check
