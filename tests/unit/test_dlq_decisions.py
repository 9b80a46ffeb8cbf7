"""Pure parts of the DLQ and redaction: the recovery worker's verdict, masking secrets."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from celery_sagas.dlq import auto_retry_verdict
from celery_sagas.protocols import DeadLetterRecord
from celery_sagas.redaction import MASK, redact

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
ENTRY = DeadLetterRecord(
    id=1,
    saga_id="S",
    saga_name="orders",
    step=1,
    step_name="pay",
    task_name="orders.refund",
    status="dead",
    attempts=3,
    deaths=1,
    error="boom",
    traceback=None,
    payload={},
    created_at=NOW,
    updated_at=NOW,
    auto_retries=0,
    next_auto_retry_at=NOW + timedelta(hours=1),
)


@pytest.mark.parametrize(
    ("entry", "action", "wait"),
    [
        (None, "done", None),
        (replace(ENTRY, status="resolved"), "done", None),
        (replace(ENTRY, status="retrying"), "done", None),
        (ENTRY, "wait", 3600.0),
        (replace(ENTRY, next_auto_retry_at=NOW), "retry", None),
        (replace(ENTRY, next_auto_retry_at=None), "retry", None),
        (replace(ENTRY, auto_retries=2, next_auto_retry_at=NOW), "retry", None),
        (replace(ENTRY, auto_retries=3, next_auto_retry_at=NOW), "give_up", None),
    ],
    ids=["gone", "resolved", "retrying", "not-yet", "due", "no-schedule", "last", "exhausted"],
)
def test_the_recovery_worker_verdict(
    entry: DeadLetterRecord | None, action: str, wait: float | None
) -> None:
    verdict = auto_retry_verdict(entry, NOW, max_retries=3)
    assert (verdict.action, verdict.wait) == (action, wait)


def test_redact_masks_named_fields_at_any_depth_case_insensitively() -> None:
    order = {
        "order_id": "O-1",
        "payment": {"method": "card", "Card_Number": "4111", "cvv": 123},
        "items": [{"sku": "A", "address": "1 Main St"}],
    }
    shown = redact(order, ["card_number", "cvv", "address"])
    assert shown == {
        "order_id": "O-1",
        "payment": {"method": "card", "Card_Number": MASK, "cvv": MASK},
        "items": [{"sku": "A", "address": MASK}],
    }
    assert order["payment"]["cvv"] == 123  # the original is untouched
