"""Declaring sagas: bad declarations fail at once and name the field."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import pytest

from celery_sagas.definition import (
    DEFAULT_STEP_TIMEOUT,
    Saga,
    Step,
    StepContext,
    idempotency_key,
    registry,
)
from celery_sagas.errors import BusinessError, SagaDefinitionError, SagaError, TransientError
from celery_sagas.policy import RetryPolicy


def reserve(ctx: StepContext) -> None: ...
def release(ctx: StepContext) -> None: ...
def charge(ctx: StepContext) -> None: ...
def refund(ctx: StepContext) -> None: ...
def ship(ctx: StepContext) -> None: ...
def recall(ctx: StepContext) -> None: ...


def reserve_step(**overrides: Any) -> Step:
    options: dict[str, Any] = {"name": "reserve", "action": reserve, "compensation": release}
    options.update(overrides)
    return Step(**options)


def order_saga(**overrides: Any) -> Saga:
    options: dict[str, Any] = {
        "name": "order",
        "steps": [reserve_step(), Step("charge", charge, refund)],
    }
    options.update(overrides)
    return Saga(**options)


# --- Step -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param({"name": "Reserve"}, "name", id="name-uppercase"),
        pytest.param({"name": "1reserve"}, "name", id="name-leading-digit"),
        pytest.param({"name": "re-serve"}, "name", id="name-dash"),
        pytest.param({"name": ""}, "name", id="name-empty"),
        pytest.param({"name": 3}, "name", id="name-not-str"),
        pytest.param({"action": "reserve"}, "steps[reserve].action", id="action-not-callable"),
        pytest.param({"action": None}, "steps[reserve].action", id="action-none"),
        pytest.param({"compensation": None}, "steps[reserve].compensation", id="no-compensation"),
        pytest.param(
            {"compensation": "release"}, "steps[reserve].compensation", id="comp-not-callable"
        ),
        pytest.param({"timeout": 0}, "steps[reserve].timeout", id="timeout-zero"),
        pytest.param({"timeout": -1.5}, "steps[reserve].timeout", id="timeout-negative"),
        pytest.param({"timeout": timedelta(0)}, "steps[reserve].timeout", id="timeout-td-zero"),
        pytest.param(
            {"timeout": timedelta(seconds=-5)}, "steps[reserve].timeout", id="timeout-td-negative"
        ),
        pytest.param({"timeout": "30"}, "steps[reserve].timeout", id="timeout-str"),
        pytest.param({"timeout": True}, "steps[reserve].timeout", id="timeout-bool"),
        pytest.param({"queue": ""}, "steps[reserve].queue", id="queue-empty"),
        pytest.param({"queue": 5}, "steps[reserve].queue", id="queue-not-str"),
        pytest.param({"retry": {"max_retries": 3}}, "steps[reserve].retry", id="retry-dict"),
        pytest.param(
            {"compensation_retry": 5},
            "steps[reserve].compensation_retry",
            id="compensation-retry-int",
        ),
        pytest.param(
            {"retry_on": [TransientError, "oops"]}, "steps[reserve].retry_on", id="retry-on-str"
        ),
        pytest.param(
            {"business_errors": [int]}, "steps[reserve].business_errors", id="business-not-exc"
        ),
        pytest.param(
            {"compensation_name": "Release"},
            "steps[reserve].compensation_name",
            id="compensation-name-bad",
        ),
    ],
)
def test_bad_step_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(SagaDefinitionError) as caught:
        reserve_step(**overrides)

    assert caught.value.field == field
    assert field in str(caught.value)
    assert str(caught.value).startswith("[definition] ")


def test_step_defaults() -> None:
    step = reserve_step()

    assert step.timeout == step.timeout_seconds == DEFAULT_STEP_TIMEOUT
    assert step.queue is None
    assert step.retry == RetryPolicy()
    assert step.compensation_retry == RetryPolicy(max_retries=5)
    assert step.retry_on == (TransientError,)
    assert step.business_errors == (BusinessError,)
    assert step.compensation_name == "release"


@pytest.mark.parametrize(
    ("timeout", "seconds"),
    [
        pytest.param(30, 30.0, id="int"),
        pytest.param(0.5, 0.5, id="float"),
        pytest.param(timedelta(minutes=2), 120.0, id="timedelta"),
        pytest.param(None, None, id="no-timeout"),
    ],
)
def test_step_timeout_is_normalised_to_seconds(
    timeout: float | timedelta | None, seconds: float | None
) -> None:
    step = reserve_step(timeout=timeout)

    assert step.timeout_seconds == seconds
    assert step.timeout == seconds
    assert seconds is None or isinstance(step.timeout, float)


def test_step_options_are_kept() -> None:
    retry = RetryPolicy(max_retries=1, jitter=0)
    step = reserve_step(
        queue="inventory",
        retry=retry,
        retry_on=[TransientError, ConnectionError],
        business_errors=[BusinessError, LookupError],
        compensation=lambda ctx: None,
        compensation_name="undo_reserve",
    )

    assert step.queue == "inventory"
    assert step.retry is retry
    assert step.retry_on == (TransientError, ConnectionError)
    assert step.business_errors == (BusinessError, LookupError)
    assert step.compensation_name == "undo_reserve"


def test_step_is_frozen() -> None:
    step = reserve_step()
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.name = "other"  # type: ignore[misc]


# --- Saga -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param({"name": "Order"}, "name", id="name-uppercase"),
        pytest.param({"name": "order saga"}, "name", id="name-space"),
        pytest.param({"name": None}, "name", id="name-none"),
        pytest.param({"steps": []}, "steps", id="no-steps"),
        pytest.param({"steps": [reserve_step(), "charge"]}, "steps[1]", id="not-a-step"),
        pytest.param(
            {"steps": [reserve_step(), reserve_step(compensation=refund)]},
            "steps[1].name",
            id="duplicate-step-name",
        ),
        pytest.param(
            {
                "steps": [
                    reserve_step(compensation_name="undo"),
                    Step("charge", charge, refund, compensation_name="undo"),
                ]
            },
            "steps[1].compensation",
            id="duplicate-compensation-name",
        ),
        pytest.param(
            {
                "steps": [
                    reserve_step(),
                    Step("charge", charge, refund, compensation_name="reserve"),
                ]
            },
            "steps[1].compensation",
            id="compensation-named-like-a-step",
        ),
        pytest.param(
            {"steps": [reserve_step(compensation_name="release"), Step("release", charge, refund)]},
            "steps[1].name",
            id="step-named-like-a-compensation",
        ),
        pytest.param(
            {"steps": [Step("reserve", reserve, release, compensation_name="reserve")]},
            "steps[0].compensation",
            id="compensation-named-like-its-step",
        ),
        pytest.param({"business_key": 42}, "business_key", id="business-key-int"),
        pytest.param({"validate": "strict"}, "validate", id="validate-not-callable"),
        pytest.param({"deadline": 0}, "deadline", id="deadline-zero"),
        pytest.param({"deadline": -60}, "deadline", id="deadline-negative"),
        pytest.param({"deadline": timedelta(0)}, "deadline", id="deadline-td-zero"),
        pytest.param({"deadline": "1h"}, "deadline", id="deadline-str"),
        pytest.param({"max_concurrent": 0}, "max_concurrent", id="max-concurrent-zero"),
        pytest.param({"max_concurrent": -3}, "max_concurrent", id="max-concurrent-negative"),
        pytest.param({"max_concurrent": 2.5}, "max_concurrent", id="max-concurrent-float"),
        pytest.param({"max_concurrent": "4"}, "max_concurrent", id="max-concurrent-str"),
        pytest.param({"max_concurrent": True}, "max_concurrent", id="max-concurrent-bool"),
    ],
)
def test_bad_saga_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(SagaDefinitionError) as caught:
        order_saga(**overrides)

    assert caught.value.field == field
    assert field in str(caught.value)


def test_saga_error_names_the_saga() -> None:
    with pytest.raises(SagaDefinitionError) as caught:
        order_saga(deadline=-1)

    assert caught.value.details == {"field": "deadline", "saga": "order"}
    assert str(caught.value) == "[definition] order: deadline: must be positive, got -1"
    assert isinstance(caught.value, SagaError)
    assert caught.value.code == "definition"


def test_duplicate_error_says_what_collided() -> None:
    with pytest.raises(SagaDefinitionError, match=r"'release'.*steps\[0\]\.compensation"):
        order_saga(
            steps=[
                reserve_step(compensation_name="release"),
                Step("charge", charge, refund, compensation_name="release"),
            ]
        )


def test_one_function_may_compensate_several_steps_under_step_names() -> None:
    saga = order_saga(
        steps=[reserve_step(compensation=refund), Step("charge", charge, refund), ship_step()]
    )

    assert [saga.compensation_task_name(i) for i in range(3)] == [
        "order.undo_reserve",
        "order.undo_charge",
        "order.recall",
    ]
    assert saga.steps[0].compensation is saga.steps[1].compensation is refund


def ship_step() -> Step:
    return Step("ship", ship, recall)


def test_a_lambda_compensation_is_named_after_its_step() -> None:
    saga = order_saga(steps=[reserve_step(compensation=lambda ctx: None), ship_step()])

    assert saga.steps[0].compensation_name == "undo_reserve"
    assert saga.compensation_task_name(0) == "order.undo_reserve"


def test_an_explicit_compensation_name_wins_over_a_function_name() -> None:
    saga = order_saga(
        steps=[reserve_step(), Step("charge", charge, refund, compensation_name="release")]
    )

    assert [saga.compensation_task_name(i) for i in range(2)] == [
        "order.undo_reserve",
        "order.release",
    ]


def test_a_function_named_like_another_step_gives_way() -> None:
    saga = order_saga(steps=[reserve_step(compensation=charge), Step("charge", charge, refund)])

    assert [saga.compensation_task_name(i) for i in range(2)] == [
        "order.undo_reserve",
        "order.refund",
    ]


def test_valid_saga() -> None:
    steps = [reserve_step(), Step("charge", charge, refund), Step("ship", ship, recall)]
    saga = Saga("order", steps, deadline=timedelta(hours=1), max_concurrent=10)

    assert saga.steps == tuple(steps)
    assert saga.step_names == ("reserve", "charge", "ship")
    assert saga.deadline == 3600.0
    assert saga.max_concurrent == 10
    assert saga.business_key == "id"
    assert saga.validate is None


@pytest.mark.parametrize(
    ("deadline", "seconds"),
    [(None, None), (90, 90.0), (1.5, 1.5), (timedelta(days=1), 86400.0)],
    ids=["none", "int", "float", "timedelta"],
)
def test_saga_deadline_is_seconds(deadline: float | timedelta | None, seconds: float) -> None:
    assert order_saga(deadline=deadline).deadline == seconds


def test_steps_may_be_any_sequence() -> None:
    saga = order_saga(steps=(step for step in [reserve_step()]))  # type: ignore[arg-type]
    assert saga.step_names == ("reserve",)


@pytest.mark.parametrize(
    ("business_key", "payload", "key"),
    [
        pytest.param("id", {"id": 42, "total": 10}, "42", id="default-field"),
        pytest.param("order_id", {"order_id": "A-1"}, "A-1", id="named-field"),
        pytest.param(
            lambda payload: f"{payload['customer']}/{payload['cart']}",
            {"customer": "c7", "cart": 3},
            "c7/3",
            id="function",
        ),
        pytest.param(lambda payload: 99, {}, "99", id="function-result-stringified"),
    ],
)
def test_key_for(
    business_key: str | Callable[[Mapping[str, Any]], str],
    payload: dict[str, Any],
    key: str,
) -> None:
    assert order_saga(business_key=business_key).key_for(payload) == key


def test_key_for_missing_field() -> None:
    with pytest.raises(KeyError):
        order_saga(business_key="order_id").key_for({"id": 1})


def test_task_names() -> None:
    saga = order_saga(
        steps=[reserve_step(), Step("charge", charge, refund, compensation_name="refund_card")]
    )

    assert [saga.step_task_name(i) for i in range(2)] == ["order.reserve", "order.charge"]
    assert [saga.compensation_task_name(i) for i in range(2)] == [
        "order.release",
        "order.refund_card",
    ]


def test_idempotency_key() -> None:
    assert idempotency_key("s-1", "charge", "action") == "s-1:charge:action"
    assert idempotency_key("s-1", "charge", "compensation") == "s-1:charge:compensation"


def test_registry() -> None:
    order, refund_saga = order_saga(), order_saga(name="refund")

    assert registry([order, refund_saga]) == {"order": order, "refund": refund_saga}

    with pytest.raises(SagaDefinitionError) as caught:
        registry([order, order_saga()])
    assert caught.value.field == "name"
    assert "order" in str(caught.value)
