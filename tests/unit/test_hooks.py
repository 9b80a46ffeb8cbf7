"""``hooks.hook_messages``: which decision fires which hook, and what the message carries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from celery_sagas import Saga, SagaDefinitionError, SagaState, Step, StepStatus
from celery_sagas.hooks import HOOK_KIND, fired_hook, hook_messages
from celery_sagas.machine import Decision, StepChange
from celery_sagas.protocols import SagaRecord, StepRecord

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def noop(_: Any) -> None:
    return None


def saga(**hooks: Any) -> Saga:
    return Saga(
        "shop",
        business_key="order_id",
        steps=[Step("pay", noop, noop, compensation_name="refund")],
        **hooks,
    )


def record(state: SagaState, status: StepStatus = StepStatus.RUNNING) -> SagaRecord:
    return SagaRecord(
        saga_id="s-1",
        name="shop",
        business_key="A-1",
        state=state,
        current_step=0,
        token=1,
        version=3,
        payload={"order_id": "A-1"},
        created_at=NOW,
        updated_at=NOW,
        steps=(StepRecord(0, "pay", status),),
    )


def decision(state: SagaState, accepted: bool = True, **extra: Any) -> Decision:
    return Decision(accepted=accepted, state=state, current_step=0, token=1, **extra)


S = SagaState


@pytest.mark.parametrize(
    ("before", "after", "accepted", "fired"),
    [
        (S.PENDING, S.COMPLETED, True, "on_completed"),
        (S.COMPENSATING, S.FAILED, True, "on_failed"),
        (S.PENDING, S.FAILED, True, "on_failed"),  # a business error at step 0
        (S.COMPENSATION_FAILED, S.FAILED, True, "on_failed"),  # an operator resolved it
        (S.COMPENSATING, S.COMPENSATION_FAILED, True, None),  # not final: waits for someone
        (S.PENDING, S.PENDING, True, None),
        (S.COMPLETED, S.COMPLETED, True, None),  # a late duplicate
        (S.PENDING, S.COMPLETED, False, None),  # ignored event
    ],
)
def test_which_decision_fires_which_hook(
    before: SagaState, after: SagaState, accepted: bool, fired: str | None
) -> None:
    assert fired_hook(record(before), decision(after, accepted)) == fired


def test_the_hook_message_carries_ids_and_the_outcome_after_the_decision() -> None:
    change = StepChange(
        0, StepStatus.RUNNING, StepStatus.COMPLETED, result={"payment_id": "p-9"}, has_result=True
    )
    (message,) = hook_messages(
        saga(on_completed="shop.done"),
        record(S.PENDING),
        decision(S.COMPLETED, step_changes=(change,)),
    )
    body = message.body
    assert body["kind"] == HOOK_KIND and body["task"] == "shop.done"
    assert body["key"] == "s-1:on_completed:hook" and body["task_id"] == "s-1.on_completed"
    assert body["kwargs"] == {
        "saga_id": "s-1",
        "business_key": "A-1",
        "outcome": {
            "state": "COMPLETED",
            "reason": None,
            "steps": [
                {
                    "name": "pay",
                    "status": "completed",
                    "result": {"payment_id": "p-9"},
                    "error": None,
                }
            ],
        },
    }


def test_no_hook_declared_means_no_message() -> None:
    assert (
        hook_messages(saga(on_failed="shop.failed"), record(S.PENDING), decision(S.COMPLETED)) == []
    )


class FakeTask:
    name = "shop.failed"


def test_a_signature_keeps_its_args_kwargs_and_queue() -> None:
    signature = {
        "task": "shop.failed",
        "args": [7],
        "kwargs": {"channel": "ops"},
        "options": {"queue": "hooks", "link": "dropped"},
    }
    (message,) = hook_messages(
        saga(on_failed=signature), record(S.COMPENSATING), decision(S.FAILED, reason="declined")
    )
    assert message.body["args"] == [7]
    assert message.body["kwargs"]["channel"] == "ops"
    assert message.body["kwargs"]["outcome"]["reason"] == "declined"
    assert message.body["options"] == {"queue": "hooks"}
    (by_task,) = hook_messages(saga(on_failed=FakeTask()), record(S.PENDING), decision(S.FAILED))
    assert by_task.body["task"] == "shop.failed"


@pytest.mark.parametrize("bad", [42, "", {"args": []}, object()])
def test_a_hook_that_is_not_a_task_fails_at_declaration(bad: Any) -> None:
    with pytest.raises(SagaDefinitionError, match="on_completed"):
        saga(on_completed=bad)
