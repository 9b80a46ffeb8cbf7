"""The example sagas: order fulfillment (four steps) and a bank transfer (three), each
step with its compensation. ``EXAMPLE_SAGAS`` is what ``workers.app`` installs."""

from __future__ import annotations

from celery_sagas import Saga, Step
from workers.bank import (
    credit_target,
    debit_source,
    notify,
    refund_source,
    reverse_credit,
    send_reversal_notice,
)
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
from workers.validation import validate_order, validate_transfer

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

# insufficient funds (or an unknown or frozen source) declines the debit: nothing moved,
# nothing compensated; a frozen target fails the credit, and the debit is refunded
bank_transfer = Saga(
    "bank_transfer",
    business_key="transfer_id",
    validate=validate_transfer,
    steps=[
        Step("debit_source", action=debit_source, compensation=refund_source),
        Step("credit_target", action=credit_target, compensation=reverse_credit),
        Step("notify", action=notify, compensation=send_reversal_notice),
    ],
)

EXAMPLE_SAGAS = (order_fulfillment, bank_transfer)
