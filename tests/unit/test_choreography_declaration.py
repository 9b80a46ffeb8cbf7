"""The choreography declaration (validated when declared) and its pure decisions: the
saga state an event leads to, the event awaiting a reaction, the stable ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celery_sagas import Choreography, SagaDefinitionError, SagaState
from celery_sagas.choreography import (
    PublishedEvent,
    awaiting_reaction,
    dead_letter_step,
    deadline_event_id,
    is_handler_dead_letter,
    start_event_id,
    track,
)

ORDER = Choreography(
    "order_choreography",
    start="OrderCreated",
    events={"InventoryReserved", "PaymentProcessed", "InventoryReleased"},
    compensating={"PaymentFailed", "OrderTimedOut"},
    succeeded="OrderFulfilled",
    failed={"OrderFailed"},
    deadline=timedelta(minutes=5),
    on_deadline="OrderTimedOut",
)


def declare(**changes: Any) -> Choreography:
    fields: dict[str, Any] = {
        "start": "OrderCreated",
        "events": {"InventoryReserved"},
        "compensating": {"PaymentFailed"},
        "succeeded": {"OrderFulfilled"},
        "failed": {"OrderFailed"},
    }
    fields.update(changes)
    name = fields.pop("name", "orders")
    return Choreography(name, **fields)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "has space"}, "name"),
        ({"succeeded": set()}, "succeeded"),
        ({"failed": ()}, "failed"),
        ({"events": {"OrderFailed"}}, "events"),  # declared twice: named where it repeats
        ({"compensating": {"OrderCreated"}}, "compensating"),
        ({"events": {"not an event"}}, "events"),
        ({"deadline": timedelta(0), "on_deadline": "PaymentFailed"}, "deadline"),
        ({"deadline": timedelta(seconds=5)}, "on_deadline"),
        ({"on_deadline": "PaymentFailed"}, "on_deadline"),
        ({"deadline": timedelta(seconds=5), "on_deadline": "InventoryReserved"}, "on_deadline"),
    ],
)
def test_a_wrong_declaration_names_its_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(SagaDefinitionError) as raised:
        declare(**changes)
    assert raised.value.field == field
    assert raised.value.code == "definition"


def test_unknown_events_are_refused_with_the_known_ones() -> None:
    assert ORDER.check_event("PaymentFailed") == "PaymentFailed"
    with pytest.raises(SagaDefinitionError, match="unknown event 'PaymentLost'") as raised:
        ORDER.check_event("PaymentLost", "on_business_error")
    assert raised.value.field == "on_business_error"
    assert "OrderCreated" in str(raised.value)


def test_handler_task_names_are_stable() -> None:
    assert ORDER.handler_task_name("payment", "charge") == "order_choreography.payment.charge"


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (None, "OrderCreated", SagaState.STARTED),
        (SagaState.STARTED, "InventoryReserved", SagaState.PENDING),
        (SagaState.PENDING, "PaymentProcessed", SagaState.PENDING),
        (SagaState.PENDING, "OrderFulfilled", SagaState.COMPLETED),
        (SagaState.PENDING, "PaymentFailed", SagaState.COMPENSATING),
        (SagaState.COMPENSATING, "InventoryReleased", SagaState.COMPENSATING),
        (SagaState.COMPENSATING, "OrderFulfilled", SagaState.COMPENSATING),  # late success
        (SagaState.COMPENSATING, "OrderFailed", SagaState.FAILED),
        (SagaState.PENDING, "OrderFailed", SagaState.FAILED),
        (SagaState.FAILED, "OrderFulfilled", SagaState.FAILED),
        (SagaState.COMPLETED, "PaymentFailed", SagaState.COMPLETED),
        (SagaState.PENDING, "OrderTimedOut", SagaState.COMPENSATING),
        (SagaState.PENDING, "OrderCreated", SagaState.PENDING),  # a second start event
    ],
)
def test_track(state: SagaState | None, event: str, expected: SagaState) -> None:
    assert track(ORDER, state, event) == expected


def event(event_id: str, name: str) -> PublishedEvent:
    return PublishedEvent(event_id, "S-1", name, "svc", {}, datetime(2026, 1, 1, tzinfo=UTC))


SUBSCRIBERS = {
    "OrderCreated": ["inventory.reserve"],
    "InventoryReserved": ["payment.charge", "audit.log"],
    "PaymentProcessed": ["shipping.create"],
}


def test_awaiting_reaction_is_the_last_event_a_subscriber_missed() -> None:
    events = [event("e1", "OrderCreated"), event("e2", "InventoryReserved")]
    reacted = {("e1", "inventory.reserve"), ("e2", "audit.log")}
    awaited = awaiting_reaction(events, reacted, SUBSCRIBERS)
    assert awaited is not None
    assert awaited.event.event_id == "e2"
    assert awaited.handlers == ("payment.charge",)


def test_awaiting_reaction_skips_events_without_subscribers_and_finished_ones() -> None:
    events = [
        event("e1", "OrderCreated"),
        event("e2", "InventoryReserved"),
        event("e3", "OrderFulfilled"),  # nobody subscribes
    ]
    reacted = {("e2", "payment.charge"), ("e2", "audit.log")}
    awaited = awaiting_reaction(events, reacted, SUBSCRIBERS)
    assert awaited is not None and awaited.event.event_id == "e1"
    everything = reacted | {("e1", "inventory.reserve")}
    assert awaiting_reaction(events, everything, SUBSCRIBERS) is None


def test_ids_are_stable_and_distinct() -> None:
    assert deadline_event_id("S-1") == deadline_event_id("S-1") != deadline_event_id("S-2")
    assert start_event_id("S-1") != deadline_event_id("S-1")
    step = dead_letter_step("payment.charge", "e1")
    assert step == dead_letter_step("payment.charge", "e1") < 0
    assert step != dead_letter_step("payment.refund", "e1")
    assert is_handler_dead_letter(step) and not is_handler_dead_letter(0)
    assert step >= -(2**31)
