"""The demo's summary and invariant checks for the orders, read from the saga and
participant tables (the transfers': ``workers.bank_demo``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select

from celery_sagas.store.tables import sagas, steps, transitions
from workers import db

ORDER_SAGA = "order_fulfillment"


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _rows_by_order(conn: Any, table: Any) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for order_id, status in conn.execute(select(table.c.order_id, table.c.status)):
        found.setdefault(order_id, []).append(status)
    return found


def _side_effects(conn: Any) -> dict[str, dict[str, list[str]]]:
    return {
        "reservations": _rows_by_order(conn, db.reservations),
        "payments": _rows_by_order(conn, db.payments),
        "shipments": _rows_by_order(conn, db.shipments),
        "notifications": _notifications(conn),
    }


def _notifications(conn: Any) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for order_id, kind in conn.execute(
        select(db.notifications.c.order_id, db.notifications.c.kind)
    ):
        found.setdefault(order_id, []).append(kind)
    return found


COMPLETED_EFFECTS = {
    "reservations": ["reserved"],
    "payments": ["captured"],
    "shipments": ["created"],
    "notifications": ["confirmation"],
}
LIVE_STATUS = {"reservations": "reserved", "payments": "captured", "shipments": "created"}


def _effects_consistent(state: str, effects: Mapping[str, list[str]]) -> bool:
    """COMPLETED: exactly one live row of each kind. FAILED: nothing left live."""
    if state == "COMPLETED":
        return all(sorted(effects.get(k, [])) == v for k, v in COMPLETED_EFFECTS.items())
    if state == "FAILED":
        return not any(LIVE_STATUS[k] in effects.get(k, []) for k in LIVE_STATUS)
    return True


def _compensated_in_reverse(conn: Any) -> bool:
    """Every saga's compensations ran in strictly decreasing step order."""
    index_of = {
        (saga_id, name): idx
        for saga_id, name, idx in conn.execute(select(steps.c.saga_id, steps.c.name, steps.c.idx))
    }
    order: dict[str, list[int]] = {}
    rows = conn.execute(
        select(transitions.c.saga_id, transitions.c.step)
        .where(transitions.c.new == "compensated")
        .order_by(transitions.c.id)
    )
    for saga_id, step in rows:
        order.setdefault(saga_id, []).append(index_of[(saga_id, step)])
    return all(seq == sorted(seq, reverse=True) for seq in order.values())


def saga_states(name: str) -> dict[str, int]:
    """How many sagas of type ``name`` are in each state."""
    query = select(sagas.c.state, func.count()).where(sagas.c.name == name).group_by(sagas.c.state)
    with db.get_engine().connect() as conn:
        return {state: int(count) for state, count in conn.execute(query)}


def build_report(
    store: Any, orders: Sequence[Mapping[str, Any]], wall_s: float, initial_stock: Mapping[str, int]
) -> dict[str, Any]:
    engine = db.get_engine()
    with engine.connect() as conn:
        saga_rows = conn.execute(
            select(
                sagas.c.id,
                sagas.c.business_key,
                sagas.c.state,
                sagas.c.created_at,
                sagas.c.finished_at,
            ).where(sagas.c.name == ORDER_SAGA)
        ).all()
        step_rows = conn.execute(
            select(
                steps.c.status, steps.c.error_kind, steps.c.attempts, steps.c.compensation_attempts
            )
            .join(sagas, sagas.c.id == steps.c.saga_id)
            .where(sagas.c.name == ORDER_SAGA)
        ).all()
        effects = _side_effects(conn)
        reserved = Counter()
        for items, status in conn.execute(
            select(db.reservations.c["items"], db.reservations.c.status)
        ):
            if status == "reserved":
                for item in items:
                    reserved[item["sku"]] += item["qty"]
        stock_now = dict(conn.execute(select(db.inventory.c.sku, db.inventory.c.on_hand)).all())
        reverse_ok = _compensated_in_reverse(conn)
        duplicates = conn.execute(
            select(func.count())
            .select_from(sagas)
            .where(sagas.c.name == ORDER_SAGA, sagas.c.business_key == orders[0]["order_id"])
        ).scalar_one()
    states = Counter(row.state for row in saga_rows)
    durations = [
        (r.finished_at - r.created_at).total_seconds() * 1000 for r in saga_rows if r.finished_at
    ]
    by_key = {r.business_key: r.state for r in saga_rows}
    failed_examples = [r.id for r in saga_rows if r.state == "FAILED"][:3]
    invariants = {
        f"one saga per order ({len(orders)} orders, {len(saga_rows)} sagas)": len(saga_rows)
        == len(orders),
        "every saga reached COMPLETED or FAILED": set(states) <= {"COMPLETED", "FAILED"},
        "starting an order twice made one saga": duplicates == 1,
        "completed orders: exactly one reservation, payment, shipment, confirmation": all(
            _effects_consistent("COMPLETED", {k: v.get(key, []) for k, v in effects.items()})
            for key, state in by_key.items()
            if state == "COMPLETED"
        ),
        "failed orders: nothing left reserved, charged or shipped": all(
            _effects_consistent("FAILED", {k: v.get(key, []) for k, v in effects.items()})
            for key, state in by_key.items()
            if state == "FAILED"
        ),
        "stock: on_hand == initial - reserved, for every sku": all(
            stock_now[sku] == initial_stock[sku] - reserved.get(sku, 0) for sku in initial_stock
        ),
        "compensations ran in strict reverse order": reverse_ok,
    }
    return {
        "total": len(saga_rows),
        "states": dict(states),
        "compensations": sum(1 for s in step_rows if s.status == "compensated"),
        "retries": sum(
            max(0, s.attempts - 1) + max(0, s.compensation_attempts - 1) for s in step_rows
        ),
        "business_failures": sum(1 for s in step_rows if s.error_kind == "business"),
        "timed_out": sum(1 for s in step_rows if s.error_kind == "timeout"),
        "duplicate_start_sagas": duplicates,
        "mean_ms": sum(durations) / len(durations) if durations else 0.0,
        "p95_ms": _percentile(durations, 0.95),
        "wall_s": wall_s,
        "stock": stock_now,
        "failed_examples": failed_examples,
        "invariants": invariants,
    }
