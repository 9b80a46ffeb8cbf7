"""The orders a case starts: a reproducible mix per case and seed."""

from __future__ import annotations

import random
from typing import Any

STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")
SHIPMENT_TIMEOUT = 3.0  # create_shipment's timeout in every case (the others: STEP_TIMEOUT)
STEP_TIMEOUT = 15.0
STOCK = {"WIDGET": 1_000_000, "GADGET": 1_000_000, "RARE-GEM": 8}


def step_timeouts() -> dict[str, float]:
    timeouts = {f"order_fulfillment.{name}": STEP_TIMEOUT for name in STEPS}
    timeouts["order_fulfillment.create_shipment"] = SHIPMENT_TIMEOUT
    return timeouts


def _base(rng: random.Random, case: str, number: int, seed: int) -> dict[str, Any]:
    return {
        "order_id": f"C-{case}-{seed}-{number:05d}",
        "items": [
            {
                "sku": rng.choice(["WIDGET", "GADGET"]),
                "qty": rng.randint(1, 3),
                "price": rng.randint(100, 5000),
            }
        ],
        "payment": {"method": "card", "card_number": "4111111111111111"},
    }


def _ordinary_mix(rng: random.Random, order: dict[str, Any]) -> None:
    """Mostly good orders; declines, scarce stock, injected failures, transient errors,
    and slow steps (so kills and restarts find steps in flight)."""
    roll = rng.random()
    if roll < 0.05:
        order["payment"]["method"] = "card_declined"
    elif roll < 0.08:
        order["items"].append({"sku": "RARE-GEM", "qty": 2, "price": 9900})
    elif roll < 0.16:
        order["simulate"] = {rng.choice(STEPS): "fail"}
    elif roll < 0.22:
        order["simulate"] = {rng.choice(STEPS): "transient:1"}
    elif roll < 0.45:
        order["simulate"] = {rng.choice(STEPS): f"slow:{rng.uniform(0.2, 1.0):.2f}"}


def make_orders(case: str, count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"{case}:{seed}")
    orders = []
    for number in range(count):
        order = _base(rng, case, number, seed)
        roll = rng.random()
        if case == "hung" and roll < 0.25:
            # hangs past create_shipment's timeout: interrupted at the soft limit
            order["simulate"] = {"create_shipment": "hang"}
            order["hang_seconds"] = SHIPMENT_TIMEOUT + 3
        elif case == "hung" and roll < 0.35:
            # ignores the soft limit: killed at the hard limit (timeout + grace)
            order["simulate"] = {"create_shipment": "stubborn"}
            order["hang_seconds"] = SHIPMENT_TIMEOUT + 20
        elif case == "late-replies" and roll < 0.5:
            # finishes just before or just after its timeout: the reply races the limit
            # and the scanner
            late = SHIPMENT_TIMEOUT + rng.uniform(-0.3, 0.3)
            order["simulate"] = {"create_shipment": f"slow:{late:.2f}"}
        else:
            _ordinary_mix(rng, order)
        orders.append(order)
    return orders


def is_hung(order: dict[str, Any]) -> bool:
    plan = order.get("simulate") or {}
    return any(v in ("hang", "stubborn") for v in plan.values()) or any(
        v.startswith("slow:") and float(v[5:]) >= SHIPMENT_TIMEOUT - 0.3
        for k, v in plan.items()
        if k == "create_shipment"
    )
