"""The ticket order: three steps, each with its compensation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery_sagas import InvalidPayloadError, RetryPolicy, Saga, Step
from ticketing.participants import (
    charge_card,
    hold_seat,
    issue_ticket,
    refund_card,
    release_seat,
    void_ticket,
)

# a refund that keeps failing reaches the dead-letter queue after one quick retry
QUICK_GIVE_UP = RetryPolicy(max_retries=1, backoff_base=0.1, backoff_cap=0.2, jitter=0)


def validate(order: Mapping[str, Any]) -> None:
    for field in ("order_id", "seat", "amount"):
        if field not in order:
            raise InvalidPayloadError(f"an order needs {field!r}")


ticket_order = Saga(
    "ticket_order",
    business_key="order_id",
    validate=validate,
    steps=[
        Step("hold_seat", action=hold_seat, compensation=release_seat),
        Step(
            "charge_card",
            action=charge_card,
            compensation=refund_card,
            timeout=30,
            compensation_retry=QUICK_GIVE_UP,
        ),
        Step("issue_ticket", action=issue_ticket, compensation=void_ticket),
    ],
)
