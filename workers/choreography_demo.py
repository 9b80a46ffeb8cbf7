"""The order choreography in the demo: ``run_choreography(n)`` starts ``n`` orders (most
succeed; every 5th card is declined, every 7th order asks for more than the stock, every
9th shipment is refused), waits until every saga is finished and checks the invariants
from the participants' own tables:

- stock is conserved: what left the shelf is exactly what fulfilled orders reserved;
- nothing is charged for a failed order (its payment, if any, is refunded);
- every fulfilled order has exactly one shipment, a failed one none left standing.

Workers consuming the services' queues must be running (a worker without ``-Q`` consumes
them all), and beat for the deadline scan and the relay.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from celery_sagas.store import SqlSagaStore
from workers import db
from workers.choreography import choreo_orders, create_tables, start_order
from workers.participants import DECLINED_CARD, order_total

SETTLED = {"COMPLETED", "FAILED"}


def make_choreo_orders(count: int, sku: str, stock: int) -> list[dict[str, Any]]:
    orders = []
    for number in range(1, count + 1):
        order: dict[str, Any] = {
            "order_id": f"CH-{uuid.uuid4().hex[:10]}",
            "items": [{"sku": sku, "qty": 1, "price": 1250}],
            "payment": {"method": "card", "card_number": "4111111111111111"},
        }
        if number % 5 == 0:
            order["payment"] = {"method": DECLINED_CARD}
        elif number % 7 == 0:
            order["items"] = [{"sku": sku, "qty": stock + 1, "price": 1250}]
        elif number % 9 == 0:
            order["simulate"] = {"shipping": "fail"}
        orders.append(order)
    return orders


def _wait(
    store: SqlSagaStore,
    ids: list[str],
    timeout: float,
    progress: Callable[[int, int], None] | None,
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while True:
        for saga_id in ids:
            if states.get(saga_id) not in SETTLED:
                record = store.load(saga_id)
                states[saga_id] = record.state.value if record else "MISSING"
        done = sum(s in SETTLED for s in states.values())
        if progress is not None:
            progress(done, len(ids))
        if done == len(ids) or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


def check_invariants(orders: list[Mapping[str, Any]], sku: str, stock: int) -> dict[str, Any]:
    """The invariants above, from the participants' tables (True when they hold)."""
    ids = [o["order_id"] for o in orders]
    by_id = {o["order_id"]: o for o in orders}
    with db.get_engine().connect() as conn:
        closed = dict(
            conn.execute(
                sa.select(choreo_orders.c.order_id, choreo_orders.c.status).where(
                    choreo_orders.c.order_id.in_(ids)
                )
            ).all()
        )
        payments = conn.execute(
            sa.select(db.payments.c.order_id, db.payments.c.status, db.payments.c.amount).where(
                db.payments.c.order_id.in_(ids)
            )
        ).all()
        shipments = Counter(
            r.order_id
            for r in conn.execute(
                sa.select(db.shipments.c.order_id).where(
                    db.shipments.c.order_id.in_(ids), db.shipments.c.status == "created"
                )
            )
        )
    fulfilled = [i for i in ids if closed.get(i) == "fulfilled"]
    shelf = sum(int(item["qty"]) for i in fulfilled for item in by_id[i]["items"])
    stock_conserved = db.stock(sku) == stock - shelf
    charged_failed = [
        p.order_id
        for p in payments
        if p.status == "captured" and closed.get(p.order_id) != "fulfilled"
    ]
    charged_right = all(
        p.amount == order_total(by_id[p.order_id]) for p in payments if p.status == "captured"
    )
    shipped_right = all(shipments[i] == (1 if i in fulfilled else 0) for i in ids)
    return {
        "stock conserved": stock_conserved,
        "nothing charged for a failed order": not charged_failed and charged_right,
        "one shipment per fulfilled order": shipped_right,
    }


def run_choreography(
    n: int,
    *,
    stock: int = 1000,
    timeout: float = 120.0,
    on: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Start ``n`` orders of the order choreography, wait for them, and return counts by
    final state, the elapsed time and the invariant checks (``ok``: all of them hold)."""
    if on is None:
        from workers.app import order_choreography as on
    create_tables()
    sku = f"CHOREO-{uuid.uuid4().hex[:8]}"
    db.seed_inventory({sku: stock})
    orders = make_choreo_orders(n, sku, stock)
    started = time.monotonic()
    ids = [start_order(on, order) for order in orders]
    states = _wait(on.saga_store, ids, timeout, progress)
    elapsed = time.monotonic() - started
    checks = check_invariants(orders, sku, stock)
    counts = Counter(states.values())
    settled = sum(counts[s] for s in SETTLED) == n
    return {
        "sagas": n,
        "states": dict(sorted(counts.items())),
        "seconds": round(elapsed, 2),
        "invariants": {"every choreographed order settled": settled, **checks},
        "ok": settled and all(checks.values()),
    }
