"""The order choreography on real worker processes (Redis + PostgreSQL): the happy path,
each failure path with exactly its compensations, a handler rolled back after publishing,
dead-lettered and drained with the CLI, the deadline scan, list/show, and a stopped
service whose events wait in its durable queue (and a replay while it is away)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from tests.integration.choreography_support import (
    choreo_order,
    eventually,
    outbox_rows,
    reactions,
    statuses,
    stock_of,
    timeline,
    wait_state,
)
from tests.integration.conftest import Deployment
from tests.support.processes import CeleryProcess

pytestmark = pytest.mark.integration

HAPPY = [
    ("OrderCreated", None),
    ("InventoryReserved", "inventory.reserve"),
    ("PaymentProcessed", "payment.charge"),
    ("ShipmentCreated", "shipping.create_shipment"),
    ("OrderFulfilled", "order.fulfil"),
]


@pytest.fixture(scope="module")
def on(deployment: Deployment) -> Any:
    from workers import choreography
    from workers.app import order_choreography

    choreography.create_tables()
    return order_choreography


@pytest.fixture(scope="module")
def services(deployment: Deployment, on: Any) -> Iterator[CeleryProcess]:
    """Inventory, payment and order (and beat, scanning every 0.5 s)."""
    env = {**deployment.env, "SAGAS_SCAN_INTERVAL": "0.5", "SAGAS_RELAY_AFTER": "1"}
    queues = ["inventory", "payment", "order", "celery", "sagas.control"]
    with deployment.worker(queues=queues, env=env, extra_args=["-B"], quick_exit=True) as worker:
        yield worker


@pytest.fixture(scope="module")
def shipping(deployment: Deployment, on: Any) -> Iterator[CeleryProcess]:
    """The shipping service's own worker (stopped and started by a test)."""
    with deployment.worker(queues=["shipping"], concurrency=1, quick_exit=True) as worker:
        yield worker


@pytest.fixture
def sku(fresh_sku: Callable[[int], str]) -> str:
    return fresh_sku(10)


@pytest.fixture
def start(on: Any, services: CeleryProcess, shipping: CeleryProcess) -> Callable[..., str]:
    from workers.choreography import start_order

    def begin(order: dict[str, Any], deadline: timedelta | None = None) -> str:
        return start_order(on, order, deadline)

    return begin


def test_happy_path_fulfils_the_order_and_tracks_the_saga(
    start: Callable[..., str], sku: str
) -> None:
    order = choreo_order(sku, qty=2)
    saga_id = start(order)
    record = wait_state(saga_id)
    assert record.state.value == "COMPLETED"
    assert record.name == "order_choreography"
    assert record.business_key == order["order_id"]
    assert record.finished_at is not None
    assert timeline(saga_id) == HAPPY
    assert reactions(saga_id) == sorted(
        [
            (h, "ok")
            for h in (
                "inventory.reserve",
                "payment.charge",
                "shipping.create_shipment",
                "order.fulfil",
            )
        ]
    )
    assert statuses(order["order_id"]) == {
        "reservations": ["reserved"],
        "payments": ["captured"],
        "shipments": ["created"],
        "choreo_orders": ["fulfilled"],
    }
    assert stock_of(sku) == 8
    assert all(sent for _, sent in outbox_rows(saga_id))


def test_prune_deletes_a_finished_choreography_with_its_timeline(
    start: Callable[..., str], sku: str
) -> None:
    import os

    from celery_sagas.store import SqlSagaStore

    saga_id = start(choreo_order(sku, qty=1))
    assert wait_state(saga_id).state.value == "COMPLETED"
    assert timeline(saga_id) == HAPPY and reactions(saga_id)
    store = SqlSagaStore(os.environ["SAGAS_DATABASE_URL"])
    after = datetime.now(UTC) + timedelta(seconds=1)
    pruned = store.prune(after, limit=10_000, name="order_choreography")
    assert pruned.rows["saga_event"] >= len(HAPPY)
    assert pruned.rows["saga_reaction"] >= 4
    assert store.load(saga_id) is None
    assert timeline(saga_id) == [] and reactions(saga_id) == []


def test_declined_card_releases_the_stock_and_nothing_else(
    start: Callable[..., str], sku: str
) -> None:
    order = choreo_order(sku, qty=3, payment={"method": "card_declined"})
    saga_id = start(order)
    record = wait_state(saga_id)
    assert record.state.value == "FAILED"
    assert record.reason == "Payment failed"
    assert timeline(saga_id) == [
        ("OrderCreated", None),
        ("InventoryReserved", "inventory.reserve"),
        ("PaymentFailed", "payment.charge"),
        ("InventoryReleased", "inventory.release"),
        ("OrderFailed", "order.fail"),
    ]
    assert ("payment.charge", "business") in reactions(saga_id)
    assert statuses(order["order_id"]) == {
        "reservations": ["released"],
        "payments": [],
        "shipments": [],
        "choreo_orders": ["failed"],
    }
    assert stock_of(sku) == 10


def test_shipment_failure_refunds_then_releases(start: Callable[..., str], sku: str) -> None:
    order = choreo_order(sku, simulate={"shipping": "fail"})
    saga_id = start(order)
    record = wait_state(saga_id)
    assert record.state.value == "FAILED"
    assert record.reason == "Shipment failed"
    assert timeline(saga_id) == [
        ("OrderCreated", None),
        ("InventoryReserved", "inventory.reserve"),
        ("PaymentProcessed", "payment.charge"),
        ("ShipmentFailed", "shipping.create_shipment"),  # its ShipmentCreated rolled back
        ("PaymentRefunded", "payment.refund"),
        ("InventoryReleased", "inventory.release_after_refund"),
        ("OrderFailed", "order.fail"),
    ]
    assert statuses(order["order_id"]) == {
        "reservations": ["released"],
        "payments": ["refunded"],
        "shipments": [],  # the business error rolled its insert back
        "choreo_orders": ["failed"],
    }
    assert stock_of(sku) == 10


def test_no_stock_fails_the_order_without_compensations(
    start: Callable[..., str], fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(1)
    order = choreo_order(sku, qty=5)
    saga_id = start(order)
    record = wait_state(saga_id)
    assert record.state.value == "FAILED"
    assert record.reason == "Out of stock"
    assert timeline(saga_id) == [
        ("OrderCreated", None),
        ("InventoryFailed", "inventory.reserve"),
        ("OrderFailed", "order.reject"),
    ]
    assert statuses(order["order_id"]) == {
        "reservations": [],
        "payments": [],
        "shipments": [],
        "choreo_orders": ["failed"],
    }
    assert stock_of(sku) == 1


def test_deadline_scan_fails_a_stalled_choreography_once(
    start: Callable[..., str], sku: str
) -> None:
    order = choreo_order(sku, simulate={"payment": "stall"})
    saga_id = start(order, deadline=timedelta(seconds=1.5))
    record = wait_state(saga_id)
    assert record.state.value == "FAILED"
    assert record.reason == "Order timed out"
    names = [name for name, _ in timeline(saga_id)]
    assert names == [
        "OrderCreated",
        "InventoryReserved",
        "OrderTimedOut",
        "PaymentRefunded",
        "InventoryReleased",
        "OrderFailed",
    ]
    assert statuses(order["order_id"]) == {
        "reservations": ["released"],
        "payments": ["void"],  # the placeholder a late InventoryReserved finds
        "shipments": ["void"],  # the placeholder a late PaymentProcessed finds
        "choreo_orders": ["failed"],
    }
    assert stock_of(sku) == 10


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def _cli(deployment: Deployment, *args: str) -> Ran:
    """``celery-sagas --app workers.app …`` in this process (the app is imported already)."""
    from celery_sagas.cli import cli

    env = {**deployment.env, "SAGAS_CELERY_APP": "workers.app"}
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr)


def test_handler_rolled_back_after_publishing_is_dead_lettered_then_drained(
    deployment: Deployment, start: Callable[..., str], sku: str
) -> None:
    order = choreo_order(sku, simulate={"faults": {"shipping.create_shipment": 3}})
    saga_id = start(order)

    def dead() -> Any:
        from celery_sagas.store import SqlSagaStore

        found = SqlSagaStore(deployment.database_url).dead_letters(saga_id, "dead")
        return found[0] if found else None

    entry = eventually(dead, "the shipping handler dead-lettered", timeout=30)
    assert entry.step_name == "shipping.create_shipment"
    assert entry.task_name == "order_choreography.shipping.create_shipment"
    assert entry.attempts == 3
    assert "SimulatedCrash" in (entry.error or "")
    # it published ShipmentCreated three times and rolled back three times: nothing left
    assert "ShipmentCreated" not in [name for name, _ in timeline(saga_id)]
    assert [name for name, _ in outbox_rows(saga_id)] == ["InventoryReserved", "PaymentProcessed"]
    assert statuses(order["order_id"])["shipments"] == []
    assert wait_state(saga_id, {"PENDING"}).state.value == "PENDING"

    listed = _cli(deployment, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert entry.id in [e["id"] for e in json.loads(listed.stdout)]
    drained = _cli(deployment, "dlq", "drain", "--wait", "30", "--json")
    # 1: another test's compensation in this database may still be dead; ours must resolve
    assert drained.returncode in (0, 1), drained.stdout + drained.stderr
    assert {e["id"]: e["status"] for e in json.loads(drained.stdout)}[entry.id] == "resolved"
    assert wait_state(saga_id).state.value == "COMPLETED"
    assert statuses(order["order_id"])["shipments"] == ["created"]
    assert [n for n, _ in timeline(saga_id)].count("ShipmentCreated") == 1
    shown = _cli(deployment, "show", saga_id, "--json")
    actions = [a["reason"] for a in json.loads(shown.stdout)["operator_actions"]]
    assert actions == [f"dead letter {entry.id} of shipping.create_shipment: retrying"]


def test_list_and_show_a_choreographed_saga(
    deployment: Deployment, start: Callable[..., str], sku: str
) -> None:
    order = choreo_order(sku)
    saga_id = start(order)
    wait_state(saga_id)
    listed = _cli(deployment, "list", "--name", "order_choreography", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["saga_id"]: r["state"] for r in json.loads(listed.stdout)}[saga_id] == "COMPLETED"
    shown = _cli(deployment, "show", order["order_id"], "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["state"] == "COMPLETED"
    refused = _cli(deployment, "cancel", saga_id, "--reason", "test")
    assert refused.returncode == 1
    assert "is a choreography (order_choreography)" in refused.stderr
    text = _cli(deployment, "show", saga_id)
    assert text.returncode == 0, text.stderr
    for line in ("published by payment", "consumed by shipping.create_shipment", "OrderFulfilled"):
        assert line in text.stdout


def test_the_sagas_page_metrics_and_stuck_alarm_see_a_choreographed_saga(
    deployment: Deployment, start: Callable[..., str], sku: str, caplog: pytest.LogCaptureFixture
) -> None:
    from celery_sagas.integration.flower import pages_for
    from celery_sagas.integration.saga_view import read_detail
    from celery_sagas.scanner import report_stuck
    from celery_sagas.store.stats import StatsReader
    from workers.app import app, sagas

    done = start(choreo_order(sku))
    stalled = start(choreo_order(sku, simulate={"payment": "stall"}), timedelta(seconds=3))
    wait_state(done)
    eventually(lambda: len(timeline(stalled)) == 2, "the stalled saga reserved its stock")

    pages = pages_for(app)
    detail = read_detail(pages.store, done, pages.redact_fields, pages.sagas, pages.choreographies)
    assert detail is not None and detail.definition_installed
    assert detail.record.state.value == "COMPLETED"
    shown = [(row.step, row.actor) for row in detail.timeline]
    assert ("ShipmentCreated", "choreography:shipping.create_shipment") in shown
    assert ("ShipmentCreated", "choreography:order.fulfil") in shown  # consumed by
    assert detail.operator_actions == []

    stats = StatsReader(deployment.database_url, settle_after=None, stuck_after=0.0)()
    assert stats.states["order_choreography"]["COMPLETED"] >= 1
    assert stats.states["order_choreography"]["PENDING"] >= 1
    assert stats.stuck["order_choreography"] >= 1
    assert "order_choreography" not in stats.unknown_definition

    with caplog.at_level("WARNING", logger="celery_sagas"):
        report_stuck(sagas.coordinator, datetime.now(UTC), 0.0, 1000)
    assert f"stuck saga {stalled} (order_choreography" in caplog.text
    assert wait_state(stalled).state.value == "FAILED"  # its deadline: nothing left moving


def test_a_stopped_service_handles_its_waiting_events_once_replay_included(
    deployment: Deployment, start: Callable[..., str], shipping: CeleryProcess, sku: str
) -> None:
    shipping.stop()
    orders = [choreo_order(sku) for _ in range(3)]
    ids = [start(o) for o in orders]

    def waiting() -> bool:
        return all(timeline(i)[-1][0] == "PaymentProcessed" for i in ids)

    eventually(waiting, "payments processed while shipping is stopped")
    dry = _cli(deployment, "replay", ids[0], "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["event"] == "PaymentProcessed"
    assert plan["handlers"] == ["shipping.create_shipment"]
    assert plan["sent"] == 0
    replayed = _cli(deployment, "replay", ids[0], "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["sent"] == 1
    shipping.start().wait_ready()
    for saga_id, order in zip(ids, orders, strict=True):
        assert wait_state(saga_id).state.value == "COMPLETED"
        assert statuses(order["order_id"])["shipments"] == ["created"]
        assert [n for n, _ in timeline(saga_id)].count("ShipmentCreated") == 1
    nothing = _cli(deployment, "replay", ids[0], "--json")
    assert json.loads(nothing.stdout)["event"] is None
    shown = json.loads(_cli(deployment, "show", ids[0], "--json").stdout)
    assert [a["reason"] for a in shown["operator_actions"]] == [
        "replayed to shipping.create_shipment"
    ]


def test_a_shipment_event_arriving_after_the_deadline_ships_nothing(
    start: Callable[..., str], shipping: CeleryProcess, sku: str
) -> None:
    """Shipping is away past the deadline: the order is failed (refunded, released) while
    PaymentProcessed waits in its queue. When shipping comes back, that late event must
    leave a shipment standing for the failed order."""
    shipping.stop()
    order = choreo_order(sku)
    saga_id = start(order, deadline=timedelta(seconds=1.5))
    assert wait_state(saga_id).state.value == "FAILED"
    shipping.start().wait_ready()

    def both_handled() -> bool:
        handlers = {h for h, _ in reactions(saga_id)}
        return {"shipping.create_shipment", "shipping.cancel_shipment"} <= handlers

    # in whichever order shipping takes them, no shipment is left standing
    eventually(both_handled, "PaymentProcessed and OrderTimedOut handled by shipping")
    found = statuses(order["order_id"])
    assert found["shipments"] in (["cancelled"], ["void"])  # cancelled, or never created
    assert found["payments"] == ["refunded"]
    assert found["reservations"] == ["released"]
    assert stock_of(sku) == 10


def test_the_relay_publishes_and_records_an_event_a_dead_worker_left_in_its_outbox(
    on: Any, start: Callable[..., str], sku: str
) -> None:
    """Payment committed PaymentProcessed in its outbox and died before publishing: beat's
    relay records it in the timeline and delivers it; the saga carries on."""
    from celery_sagas.choreography import OutgoingEvent
    from workers import db

    order = choreo_order(sku, simulate={"payment": "stall"})
    saga_id = start(order, timedelta(seconds=60))
    eventually(lambda: len(timeline(saga_id)) == 2, "inventory reserved")
    events, _ = on.store.timeline(saga_id)
    left = OutgoingEvent(
        event_id="00000000-0000-4000-8000-" + saga_id[-12:],
        saga_id=saga_id,
        name="PaymentProcessed",
        service="payment",
        data=dict(events[-1].data),
        handler="payment.charge",
        caused_by=events[-1].event_id,
    )
    with db.get_engine().begin() as conn:
        on.service_outbox("payment")._write(conn, left, on.clock())
    record = wait_state(saga_id)
    assert record.state.value == "COMPLETED"
    assert timeline(saga_id)[2] == ("PaymentProcessed", "payment.charge")
    assert outbox_rows(saga_id)[1] == ("PaymentProcessed", True)


def test_the_demo_run_checks_its_invariants(on: Any, start: Callable[..., str]) -> None:
    from workers.choreography_demo import run_choreography

    report = run_choreography(12, on=on, stock=20, timeout=60)
    assert report["states"] == {"COMPLETED": 8, "FAILED": 4}
    assert report["invariants"] == {
        "every choreographed order settled": True,
        "stock conserved": True,
        "nothing charged for a failed order": True,
        "one shipment per fulfilled order": True,
    }
    assert report["ok"]
