"""The test kit for users' sagas: scripted faults and the every-step helper, on a toy saga
(through the ``saga_harness`` fixture of the pytest plugin) and on the example order saga
with its real participants on a SQLite file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_sagas import Saga, Step
from celery_sagas.definition import RetryPolicy, StepContext
from celery_sagas.machine import SagaState, StepStatus
from celery_sagas.testing import (
    CrashAfterEffect,
    Decline,
    DeliverTwice,
    FailCompensation,
    FailStep,
    Hang,
    SagaHarness,
    assert_compensates_at_every_step,
)

NAMES = ("reserve", "charge", "ship")


class Ledger:
    """Participants with an idempotent journal of effects, keyed by idempotency key."""

    def __init__(self) -> None:
        self.effects: dict[str, str] = {}

    def saga(self, broken_undo: str | None = None) -> Saga:
        def act(name: str) -> Callable[[StepContext], Any]:
            def run(ctx: StepContext) -> Any:
                self.effects.setdefault(ctx.idempotency_key, f"did {name}")
                return {"done": name, "order": ctx.payload["id"]}

            return run

        def undo(name: str) -> Callable[[StepContext], Any]:
            def run(ctx: StepContext) -> Any:
                if name == broken_undo:
                    raise RuntimeError(f"cannot undo {name}")
                self.effects.setdefault(ctx.idempotency_key, f"undid {name}")

            return run

        return Saga(
            "toy",
            [
                Step(
                    n,
                    act(n),
                    undo(n),
                    compensation_name=f"undo_{n}",
                    timeout=5,
                    compensation_retry=RetryPolicy(max_retries=1),
                )
                for n in NAMES
            ],
        )


def test_every_step_index_compensates_in_reverse(saga_harness: Any) -> None:
    records = assert_compensates_at_every_step(Ledger().saga(), {"id": "o-1"})
    assert len(records) == 2 * len(NAMES)
    assert {r.state for r in records} == {SagaState.FAILED}


def test_the_helper_names_the_step_and_shows_the_timeline() -> None:
    with pytest.raises(AssertionError) as failed:
        assert_compensates_at_every_step(Ledger().saga(broken_undo="reserve"), {"id": "o-2"})
    text = str(failed.value)
    assert "(error) injected at step 0 (reserve)" in text  # it may have acted: undone
    assert "COMPENSATION_FAILED, not FAILED" in text
    assert "timeline:" in text and "reserve: compensating -> compensation_failed" in text


def test_a_transient_failure_on_one_attempt_is_retried(saga_harness: Any) -> None:
    ledger = Ledger()
    harness = saga_harness(ledger.saga(), faults=[FailStep("charge", attempts=(1,))])
    record = harness.run({"id": "o-3"})
    assert record.state == SagaState.FAILED  # RuntimeError is not in retry_on: compensated
    step = Step("x", lambda c: 1, lambda c: None, compensation_name="y", retry_on=(RuntimeError,))
    retried = SagaHarness(Saga("one", [step]), faults=[FailStep("x", attempts=(1,))])
    assert retried.run({"id": "o-4"}).state == SagaState.COMPLETED
    assert [c.attempt for c in retried.calls] == [1, 2]


def test_a_hung_step_is_timed_out_by_the_scan_and_compensated(saga_harness: Any) -> None:
    harness = saga_harness(Ledger().saga(), faults=[Hang("ship")])
    record = harness.run({"id": "o-5"})
    assert record.state == SagaState.FAILED
    assert record.steps[2].error_kind is not None and record.steps[2].error_kind.value == "timeout"
    undone = [c.step for c in harness.calls if c.role == "compensation"]
    assert undone == ["ship", "charge", "reserve"]  # the hung step may have acted


def test_a_crash_after_the_effect_redelivers_and_acts_once(saga_harness: Any) -> None:
    ledger = Ledger()
    harness = saga_harness(ledger.saga(), faults=[CrashAfterEffect("charge")])
    record = harness.run({"id": "o-6"})
    assert record.state == SagaState.COMPLETED
    charges = [c for c in harness.calls if c.step == "charge" and c.role == "action"]
    assert len(charges) == 2 and charges[0].key == charges[1].key  # the same key twice
    assert sum(1 for v in ledger.effects.values() if v == "did charge") == 1


def test_a_message_delivered_twice_and_a_double_scan_change_nothing(saga_harness: Any) -> None:
    harness = saga_harness(Ledger().saga(), faults=[DeliverTwice("reserve")])
    saga_id = harness.start({"id": "o-7"})
    harness.scan()
    harness.scan()
    record = harness.settle(saga_id)
    assert record.state == SagaState.COMPLETED
    assert [c.step for c in harness.calls if c.role == "action"] == list(NAMES)


def test_a_failing_compensation_is_dead_lettered_then_retried(saga_harness: Any) -> None:
    faults = [Decline("ship"), FailCompensation("charge")]
    harness = saga_harness(Ledger().saga(), faults=faults)
    saga_id = harness.start({"id": "o-8"})
    record = harness.settle(saga_id)
    assert record.state == SagaState.COMPENSATION_FAILED
    assert record.steps[1].status == StepStatus.COMPENSATION_FAILED
    assert len(harness.store.dead_letters(saga_id=saga_id, status="dead")) == 1
    record = harness.retry_dead_letters(saga_id)
    assert record.state == SagaState.FAILED
    assert [s.status for s in record.steps][:2] == [StepStatus.COMPENSATED] * 2


# --------------------------------------------------------------------------- the example


@pytest.fixture
def participants_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from workers import db

    monkeypatch.setenv("PARTICIPANTS_DATABASE_URL", f"sqlite:///{tmp_path / 'shop.db'}")
    db.reset_engine()
    db.create_tables()
    db.seed_inventory({"BOOK-1": 10})
    yield "BOOK-1"
    db.reset_engine()


def test_the_example_order_saga_compensates_at_every_step(participants_on_sqlite: str) -> None:
    from workers import db
    from workers.sagas import order_fulfillment

    order = {
        "order_id": "K-1",
        "items": [{"sku": participants_on_sqlite, "qty": 2, "price": 1250}],
        "payment": {"method": "card", "card_number": "4111111111111111"},
    }
    records = assert_compensates_at_every_step(order_fulfillment, order)
    assert {r.state for r in records} == {SagaState.FAILED}
    assert db.stock(participants_on_sqlite) == 10  # every reservation released
