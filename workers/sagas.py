"""The order-fulfillment saga: four steps, each with its compensation."""

from __future__ import annotations

from celery_sagas import Saga, Step
from workers.hooks import ORDER_COMPLETED, ORDER_FAILED
from workers.participants import (
    cancel_shipment,
    create_shipment,
    process_payment,
    refund_payment,
    release_inventory,
    reserve_inventory,
    send_cancellation_notice,
    send_confirmation,
)
from workers.validation import validate_order

order_fulfillment = Saga(
    "order_fulfillment",
    business_key="order_id",
    validate=validate_order,
    on_completed=ORDER_COMPLETED,  # task names (a task or a signature works too)
    on_failed=ORDER_FAILED,
    steps=[
        Step("reserve_inventory", action=reserve_inventory, compensation=release_inventory),
        Step("process_payment", action=process_payment, compensation=refund_payment),
        Step("create_shipment", action=create_shipment, compensation=cancel_shipment),
        Step("send_confirmation", action=send_confirmation, compensation=send_cancellation_notice),
    ],
)
