"""``validate_order`` refuses each kind of bad order with a message naming the problem."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from celery_sagas.errors import InvalidPayloadError
from workers.validation import order_key, parse_simulation, validate_order

GOOD_ORDER: dict[str, Any] = {
    "order_id": "A-1001",
    "items": [{"sku": "BOOK", "qty": 2, "price": 1250}, {"sku": "PEN", "qty": 1, "price": 0}],
    "payment": {"method": "card"},
    "address": "1 Example Street",
    "simulate": {"process_payment": "transient:2", "refund_payment": "slow:0.5"},
    "hang_seconds": 5,
}


def order_with(**changes: Any) -> dict[str, Any]:
    """The good order with top-level fields replaced (``None`` as value: removed)."""
    order = copy.deepcopy(GOOD_ORDER)
    for field, value in changes.items():
        if value is None:
            order.pop(field, None)
        else:
            order[field] = value
    return order


def with_item(**changes: Any) -> dict[str, Any]:
    """The good order whose first item has fields replaced (``None``: removed)."""
    item = dict(GOOD_ORDER["items"][0])
    for field, value in changes.items():
        if value is None:
            item.pop(field, None)
        else:
            item[field] = value
    return order_with(items=[item])


BAD_ORDERS = [
    pytest.param(["not", "a", "dict"], "order must be a dict, got list", id="not-a-dict"),
    pytest.param(None, "order must be a dict, got NoneType", id="none"),
    pytest.param(order_with(order_id=None), "order_id is missing", id="no-order-id"),
    pytest.param(order_with(order_id=""), "order_id must be a non-empty string", id="empty-id"),
    pytest.param(order_with(order_id="  "), "order_id must be a non-empty string", id="blank-id"),
    pytest.param(
        order_with(order_id=42), "order_id must be a non-empty string, got 42", id="int-id"
    ),
    pytest.param(order_with(items=None), "items is missing", id="no-items"),
    pytest.param(order_with(items=[]), "items must not be empty", id="empty-items"),
    pytest.param(order_with(items={"sku": "X"}), "items must be a list, got dict", id="items-dict"),
    pytest.param(order_with(items=["BOOK"]), "items[0] must be an object, got str", id="item-str"),
    pytest.param(with_item(sku=None), "items[0].sku must be a non-empty string", id="no-sku"),
    pytest.param(with_item(sku=7), "items[0].sku must be a non-empty string, got 7", id="int-sku"),
    pytest.param(with_item(qty=None), "items[0].qty must be a positive integer", id="no-qty"),
    pytest.param(with_item(qty=0), "items[0].qty must be a positive integer, got 0", id="zero-qty"),
    pytest.param(with_item(qty=-1), "items[0].qty must be a positive integer", id="neg-qty"),
    pytest.param(with_item(qty=1.5), "items[0].qty must be a positive integer", id="float-qty"),
    pytest.param(with_item(qty=True), "items[0].qty must be a positive integer", id="bool-qty"),
    pytest.param(with_item(price=None), "items[0].price must be a non-negative", id="no-price"),
    pytest.param(with_item(price=-1), "items[0].price must be a non-negative integer", id="neg"),
    pytest.param(with_item(price=9.99), "price must be a non-negative integer (cents)", id="float"),
    pytest.param(order_with(payment=None), "payment must be an object", id="no-payment"),
    pytest.param(order_with(payment="card"), "payment must be an object", id="payment-str"),
    pytest.param(
        order_with(payment={}), "payment.method must be a non-empty string", id="no-method"
    ),
    pytest.param(
        order_with(payment={"method": 3}),
        "payment.method must be a non-empty string",
        id="int-method",
    ),
    pytest.param(order_with(simulate=["fail"]), "simulate must be an object", id="simulate-list"),
    pytest.param(order_with(simulate={1: "fail"}), "simulate keys must be strings", id="int-key"),
    pytest.param(
        order_with(simulate={"process_payment": "boom"}),
        "simulate['process_payment'] must be one of fail, hang, stubborn, deaf, "
        "transient:N or slow:S",
        id="unknown-behaviour",
    ),
    pytest.param(
        order_with(simulate={"process_payment": "transient"}), "must be one of", id="transient-no-n"
    ),
    pytest.param(order_with(simulate={"process_payment": "slow:x"}), "must be one of", id="slow-x"),
    pytest.param(order_with(simulate={"process_payment": 1}), "got 1", id="behaviour-int"),
    pytest.param(order_with(hang_seconds=-1), "hang_seconds must be a non-negative", id="hang"),
    pytest.param(order_with(note={1, 2}), "order must be JSON-serialisable", id="set-value"),
    pytest.param(order_with(note=math.nan), "order must be JSON-serialisable", id="nan"),
]


@pytest.mark.parametrize(("order", "message"), BAD_ORDERS)
def test_bad_orders_are_refused_with_a_precise_message(order: Any, message: str) -> None:
    with pytest.raises(InvalidPayloadError) as raised:
        validate_order(order)
    assert message in raised.value.message
    assert raised.value.code == "invalid_payload"


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(GOOD_ORDER, id="full"),
        pytest.param(order_with(simulate=None, hang_seconds=None, address=None), id="minimal"),
        pytest.param(
            order_with(simulate={"a": "fail", "b": "hang", "c": "transient:3", "d": "slow:2"}),
            id="every-simulation",
        ),
    ],
)
def test_good_orders_pass(order: dict[str, Any]) -> None:
    validate_order(order)


def test_order_key_is_the_order_id() -> None:
    assert order_key(GOOD_ORDER) == "A-1001"


@pytest.mark.parametrize(
    ("behaviour", "parsed"),
    [("fail", ("fail", 0.0)), ("transient:2", ("transient", 2.0)), ("slow:0.5", ("slow", 0.5))],
)
def test_parse_simulation(behaviour: str, parsed: tuple[str, float]) -> None:
    assert parse_simulation(behaviour) == parsed


def test_parse_simulation_refuses_unknown_forms() -> None:
    with pytest.raises(ValueError, match="unknown simulation"):
        parse_simulation("explode")
