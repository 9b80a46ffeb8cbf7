"""Checking a payload before its saga starts: an order (order fulfillment) or a transfer
(bank transfer, ``validate_transfer``, see the end of this module).

``validate_order`` raises ``InvalidPayloadError`` naming the first field that is wrong, so a
bad order is refused up front instead of failing half-way through the saga.

An order looks like::

    {
        "order_id": "A-1001",
        "items": [{"sku": "BOOK", "qty": 2, "price": 1250}],   # price in cents
        "payment": {"method": "card"},                           # "card_declined" declines
        "address": "...",                                        # optional
        "simulate": {"process_payment": "transient:2"},         # optional, demos and tests
        "hang_seconds": 30,                                      # optional, for "hang"
    }
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, TypeGuard

from celery_sagas.errors import InvalidPayloadError

SIMULATION_PATTERN = re.compile(r"^(fail|hang|stubborn|deaf|transient:\d+|slow:\d+(\.\d+)?)$")
SIMULATION_FORMS = "fail, hang, stubborn, deaf, transient:N or slow:S"


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_non_empty_string(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_text(payload: Mapping[str, Any], name: str) -> None:
    if name not in payload:
        raise InvalidPayloadError(f"{name} is missing")
    if not _is_non_empty_string(payload[name]):
        raise InvalidPayloadError(f"{name} must be a non-empty string, got {payload[name]!r}")


def _check_item(index: int, item: object) -> None:
    where = f"items[{index}]"
    if not isinstance(item, Mapping):
        raise InvalidPayloadError(f"{where} must be an object, got {type(item).__name__}")
    if not _is_non_empty_string(item.get("sku")):
        raise InvalidPayloadError(
            f"{where}.sku must be a non-empty string, got {item.get('sku')!r}"
        )
    qty = item.get("qty")
    if not _is_int(qty) or qty <= 0:
        raise InvalidPayloadError(f"{where}.qty must be a positive integer, got {qty!r}")
    price = item.get("price")
    if not _is_int(price) or price < 0:
        raise InvalidPayloadError(
            f"{where}.price must be a non-negative integer (cents), got {price!r}"
        )


def _check_items(order: Mapping[str, Any]) -> None:
    items = order.get("items")
    if items is None:
        raise InvalidPayloadError("items is missing")
    if not isinstance(items, list):
        raise InvalidPayloadError(f"items must be a list, got {type(items).__name__}")
    if not items:
        raise InvalidPayloadError("items must not be empty")
    for index, item in enumerate(items):
        _check_item(index, item)


def _check_payment(order: Mapping[str, Any]) -> None:
    payment = order.get("payment")
    if not isinstance(payment, Mapping):
        raise InvalidPayloadError(
            f"payment must be an object with a 'method', got {type(payment).__name__}"
        )
    if not _is_non_empty_string(payment.get("method")):
        raise InvalidPayloadError(
            f"payment.method must be a non-empty string, got {payment.get('method')!r}"
        )


def _check_simulate(order: Mapping[str, Any]) -> None:
    if "simulate" not in order:
        return
    simulate = order["simulate"]
    if not isinstance(simulate, Mapping):
        raise InvalidPayloadError(
            f"simulate must be an object mapping function names to behaviours, "
            f"got {type(simulate).__name__}"
        )
    for name, behaviour in simulate.items():
        if not isinstance(name, str):
            raise InvalidPayloadError(f"simulate keys must be strings, got {name!r}")
        if not isinstance(behaviour, str) or not SIMULATION_PATTERN.match(behaviour):
            raise InvalidPayloadError(
                f"simulate[{name!r}] must be one of {SIMULATION_FORMS}, got {behaviour!r}"
            )


def _check_hang_seconds(order: Mapping[str, Any]) -> None:
    if "hang_seconds" not in order:
        return
    seconds = order["hang_seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise InvalidPayloadError(f"hang_seconds must be a non-negative number, got {seconds!r}")


def _check_json(payload: Mapping[str, Any], what: str = "order") -> None:
    try:
        json.dumps(dict(payload), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidPayloadError(f"{what} must be JSON-serialisable: {exc}") from exc


def validate_order(order: object) -> None:
    """Raise ``InvalidPayloadError`` if ``order`` cannot start an order-fulfillment saga."""
    if not isinstance(order, Mapping):
        raise InvalidPayloadError(f"order must be a dict, got {type(order).__name__}")
    _check_text(order, "order_id")
    _check_items(order)
    _check_payment(order)
    _check_simulate(order)
    _check_hang_seconds(order)
    _check_json(order)


def order_key(order: Mapping[str, Any]) -> str:
    """The order's business key: one saga per ``order_id``."""
    return str(order["order_id"])


def parse_simulation(behaviour: str) -> tuple[str, float]:
    """Split ``"transient:2"`` into ``("transient", 2.0)``; plain forms get ``0.0``."""
    if not SIMULATION_PATTERN.match(behaviour):
        raise ValueError(f"unknown simulation {behaviour!r}: expected {SIMULATION_FORMS}")
    kind, _, argument = behaviour.partition(":")
    return kind, float(argument) if argument else 0.0


# --- the bank transfer ------------------------------------------------------------------


def validate_transfer(transfer: object) -> None:
    """Raise ``InvalidPayloadError`` if ``transfer`` cannot start a bank-transfer saga.

    A transfer looks like ``{"transfer_id": "TR-1", "source": "ACC-1", "target": "ACC-2",
    "amount": 2500}`` (cents), with the optional ``simulate`` and ``hang_seconds`` of an
    order. Whether the accounts exist, are frozen or hold enough is the bank's to say.
    """
    if not isinstance(transfer, Mapping):
        raise InvalidPayloadError(f"transfer must be a dict, got {type(transfer).__name__}")
    for name in ("transfer_id", "source", "target"):
        _check_text(transfer, name)
    if transfer["source"] == transfer["target"]:
        raise InvalidPayloadError(
            f"source and target must be different accounts, got {transfer['source']!r} twice"
        )
    amount = transfer.get("amount")
    if not _is_int(amount) or amount <= 0:
        raise InvalidPayloadError(f"amount must be a positive integer (cents), got {amount!r}")
    _check_simulate(transfer)
    _check_hang_seconds(transfer)
    _check_json(transfer, "transfer")
