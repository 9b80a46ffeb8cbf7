"""Ground truth after a case: the participants' own tables, then the saga transition log.

The saga tables say what the library believes; the participant tables say what happened
to the customer. Both are read with plain SQL, so a bug in the store cannot hide itself.

- lost: an order the caller started (``delay`` returned) whose saga is missing or not
  settled at the end.
- double forward effects: more than one reservation, payment, shipment or confirmation
  row for an order, or stock taken more often than the live reservations explain.
- double compensations: a step compensated twice in the log, more than one cancellation
  notice for an order, or stock returned more often than reservations were released.
- wrong end state: a COMPLETED order without exactly one live reservation, captured
  payment, created shipment and confirmation (or with a cancellation); a FAILED order with
  anything still reserved, captured or shipped, or whose last notice is a confirmation.
- illegal transitions: per step and per saga, a transition whose ``old`` is not the
  previous ``new``; a step completed twice; a forward step (running, completed) after its
  saga began compensating; any transition of a saga after it reached COMPLETED or FAILED.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

SETTLED = {"COMPLETED", "FAILED", "COMPENSATION_FAILED"}
FINAL = {"COMPLETED", "FAILED"}
FORWARD_AFTER_COMPENSATION = {"running", "completed"}


@dataclass
class Findings:
    started: int = 0
    states: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    double_forward: list[str] = field(default_factory=list)
    double_compensation: list[str] = field(default_factory=list)
    wrong_end_state: list[str] = field(default_factory=list)
    illegal: list[str] = field(default_factory=list)
    unsent_outbox: int = 0
    confirmation_and_cancellation: int = 0
    stock_delta: dict[str, int] = field(default_factory=dict)

    @property
    def terminal(self) -> int:
        return sum(n for s, n in self.states.items() if s in SETTLED)

    def as_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "terminal": self.terminal,
            "states": dict(self.states),
            "lost": self.lost,
            "double_forward": self.double_forward,
            "double_compensation": self.double_compensation,
            "wrong_end_state": self.wrong_end_state,
            "illegal": self.illegal,
            "unsent_outbox": self.unsent_outbox,
            "confirmation_and_cancellation": self.confirmation_and_cancellation,
            "stock_delta": self.stock_delta,
        }


def _rows(conn: sa.Connection, sql: str) -> list[Any]:
    return list(conn.execute(sa.text(sql)))


def _effects(conn: sa.Connection) -> dict[str, dict[str, list[Any]]]:
    """Rows per order of each participant table: (status, extra)."""
    found: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for order_id, status in _rows(conn, "SELECT order_id, status FROM reservations"):
        found[order_id]["reservations"].append(status)
    for order_id, status, amount in _rows(conn, "SELECT order_id, status, amount FROM payments"):
        # a refunded row of amount 0 is the tombstone a compensation leaves when the
        # payment never happened
        found[order_id]["payments"].append(status if amount else f"{status}:none")
    for order_id, status in _rows(conn, "SELECT order_id, status FROM shipments"):
        found[order_id]["shipments"].append(status)
    for order_id, kind in _rows(conn, "SELECT order_id, kind FROM notifications ORDER BY id"):
        found[order_id]["notifications"].append(kind)
    return found


def _check_order(order_id: str, state: str, effects: Mapping[str, list[Any]], f: Findings) -> None:
    reservations = effects.get("reservations", [])
    payments = [p for p in effects.get("payments", []) if not p.endswith(":none")]
    shipments = effects.get("shipments", [])
    mails = Counter(effects.get("notifications", []))
    live_shipments = [s for s in shipments if s == "created"]
    if len(reservations) > 1 or len(payments) > 1 or len(shipments) > 1:
        f.double_forward.append(f"{order_id}: {dict(effects)}")
    if mails["confirmation"] > 1:
        f.double_forward.append(f"{order_id}: {mails['confirmation']} confirmations")
    if mails["cancellation"] > 1:
        f.double_compensation.append(f"{order_id}: {mails['cancellation']} cancellations")
    if mails["confirmation"] and mails["cancellation"]:
        f.confirmation_and_cancellation += 1
    if state == "COMPLETED":
        complete = (
            reservations == ["reserved"]
            and payments == ["captured"]
            and live_shipments == ["created"]
            and mails == Counter({"confirmation": 1})
        )
        if not complete:
            f.wrong_end_state.append(f"{order_id} COMPLETED: {dict(effects)}")
    elif state == "FAILED":
        still_live = "reserved" in reservations or "captured" in payments or live_shipments
        # a confirmation sent for a failed order must be followed by a cancellation notice
        notices = effects.get("notifications", [])
        unanswered = notices[-1:] == ["confirmation"]
        if still_live or unanswered:
            f.wrong_end_state.append(f"{order_id} FAILED: {dict(effects)}")


def _check_stock(conn: sa.Connection, initial: Mapping[str, int], f: Findings) -> None:
    reserved: Counter[str] = Counter()
    for items, status in _rows(conn, "SELECT items, status FROM reservations"):
        if status == "reserved":
            for item in items:
                reserved[item["sku"]] += int(item["qty"])
    on_hand = dict(_rows(conn, "SELECT sku, on_hand FROM inventory"))
    for sku, start in initial.items():
        delta = on_hand.get(sku, 0) - (start - reserved[sku])
        if delta:
            f.stock_delta[sku] = delta
            target = f.double_compensation if delta > 0 else f.double_forward
            target.append(f"stock {sku}: on_hand off by {delta:+d}")


def _check_transitions(conn: sa.Connection, f: Findings) -> None:
    rows = _rows(
        conn, "SELECT saga_id, step, old, new, id FROM saga_transition ORDER BY saga_id, id"
    )
    by_saga: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_saga[row.saga_id].append(row)
    for saga_id, log in by_saga.items():
        _check_saga_log(saga_id, log, f)


def _check_saga_log(saga_id: str, log: Iterable[Any], f: Findings) -> None:
    last: dict[str | None, str] = {}
    completed: Counter[str] = Counter()
    compensated: Counter[str] = Counter()
    compensating = False
    final: str | None = None
    for row in log:
        where = f"saga {saga_id} transition {row.id} {row.step or 'saga'} {row.old}->{row.new}"
        if final is not None:
            f.illegal.append(f"{where}: after the saga was {final}")
        previous = last.get(row.step)
        if previous is not None and row.old != previous:
            f.illegal.append(f"{where}: previous state was {previous}")
        last[row.step] = row.new
        if row.step is None:
            compensating = compensating or row.new == "COMPENSATING"
            if row.new in FINAL:
                final = row.new
            continue
        if compensating and row.new in FORWARD_AFTER_COMPENSATION:
            f.illegal.append(f"{where}: forward step after compensation began")
        if row.new == "completed":
            completed[row.step] += 1
            if completed[row.step] > 1:
                f.illegal.append(f"{where}: completed twice")
        if row.new == "compensated":
            compensated[row.step] += 1
            if compensated[row.step] > 1:
                f.double_compensation.append(f"{where}: compensated twice")


def collect(
    engine: sa.Engine, order_ids: Iterable[str], initial_stock: Mapping[str, int]
) -> Findings:
    f = Findings()
    orders = list(order_ids)
    f.started = len(orders)
    with engine.connect() as conn:
        state_of = dict(_rows(conn, "SELECT business_key, state FROM saga"))
        effects = _effects(conn)
        for order_id in orders:
            state = state_of.get(order_id, "MISSING")
            f.states[state] += 1
            if state not in SETTLED:
                f.lost.append(f"{order_id}: {state}")
                continue
            _check_order(order_id, state, effects.get(order_id, {}), f)
        _check_stock(conn, initial_stock, f)
        _check_transitions(conn, f)
        f.unsent_outbox = int(
            conn.execute(
                sa.text("SELECT count(*) FROM saga_outbox WHERE sent_at IS NULL")
            ).scalar_one()
        )
    return f


def settled_count(engine: sa.Engine, order_ids: Iterable[str]) -> int:
    keys = list(order_ids)
    if not keys:
        return 0
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM saga WHERE business_key = ANY(:keys) "
                    "AND state IN ('COMPLETED', 'FAILED', 'COMPENSATION_FAILED')"
                ),
                {"keys": keys},
            ).scalar_one()
        )
