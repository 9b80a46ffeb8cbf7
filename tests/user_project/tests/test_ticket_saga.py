"""The user's own unit tests of their saga, with celery-sagas' test kit from the installed
package: no broker, no database (the participants are replaced by in-memory fakes), a
failure at every step index, and the ``saga_harness`` fixture of the pytest plugin."""

from __future__ import annotations

from typing import Any

from ticketing.sagas import ticket_order

from celery_sagas import SagaState, StepContext
from celery_sagas.testing import Decline, SagaHarness, assert_compensates_at_every_step

ORDER = {"order_id": "T-1", "seat": "12A", "amount": "25.00"}
LEDGER: dict[str, str] = {}


def fake(name: str) -> Any:
    def run(ctx: StepContext) -> dict[str, str]:
        LEDGER.setdefault(ctx.idempotency_key, name)
        return {"did": name}

    return run


FAKES = {
    f"ticket_order.{name}": fake(name)
    for name in (
        "hold_seat",
        "release_seat",
        "charge_card",
        "refund_card",
        "issue_ticket",
        "void_ticket",
    )
}


def test_a_failure_at_every_step_is_compensated_in_reverse() -> None:
    records = assert_compensates_at_every_step(ticket_order, ORDER, participants=FAKES)
    assert {r.state for r in records} == {SagaState.FAILED}


def test_a_declined_card_releases_the_seat(saga_harness: Any) -> None:
    harness: SagaHarness = saga_harness(
        ticket_order, faults=[Decline("charge_card")], participants=FAKES
    )
    record = harness.run(ORDER)
    assert record.state == SagaState.FAILED
    undone = [c.step for c in harness.calls if c.role == "compensation"]
    assert undone == ["hold_seat"]  # the card step declined: nothing to refund
