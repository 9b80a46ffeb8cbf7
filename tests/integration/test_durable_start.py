"""The durable start (issue 10) on real processes: ``start_saga.delay(order)`` commits the
saga before it returns, whatever the broker does; inside the application's transaction;
concurrently from several processes; and a handle that waits for the outcome."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.orm import Session

from celery_sagas import PayloadConflictError, install
from celery_sagas.errors import InvalidPayloadError
from celery_sagas.integration import SagaRuntime
from celery_sagas.store.tables import outbox, sagas
from tests.integration.conftest import Deployment, make_order, rows_for, saga_by_key
from tests.integration.test_deadlines import running
from tests.support.processes import CeleryProcess, wait_until
from tests.support.redis_server import RedisServer, redis_server
from workers import db
from workers.sagas import order_fulfillment

FAST_RELAY = {"SAGAS_RELAY_AFTER": 1, "SAGAS_RELAY_INTERVAL": 0.5}


@pytest.fixture
def caller(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], SagaRuntime]:
    """An application process's Celery app on a broker of the test's own (the saga
    database is the deployment's)."""
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)  # it would win over broker=

    def make(broker_url: str, **settings: Any) -> SagaRuntime:
        app = Celery("caller", broker=broker_url)
        return install(app, [order_fulfillment], database_url=deployment.database_url, **settings)

    return make


def outbox_rows(saga_id: str) -> list[Any]:
    with db.get_engine().connect() as conn:
        return list(conn.execute(sa.select(outbox).where(outbox.c.saga_id == saga_id)))


def outcome_rows(order_id: str) -> list[tuple[str, str]]:
    return [(r.hook, r.state) for r in rows_for(db.order_outcomes, order_id)]


# --------------------------------------------------------------------------- the broker


def test_delay_with_the_broker_down_succeeds_and_the_saga_runs_once_it_is_up(
    deployment: Deployment,
    caller: Callable[[str], SagaRuntime],
    fresh_sku: Callable[[int], str],
    tmp_path: Path,
) -> None:
    broker = RedisServer(tmp_path / "redis")  # not started: nothing listens on its port
    start = caller(broker.url).start_task("order_fulfillment")
    order = make_order(fresh_sku(5))
    began = time.monotonic()
    handle = start.delay(order)
    took = time.monotonic() - began
    assert took < 5, f"delay() held the caller {took:.1f}s with the broker down"
    assert handle.state().value == "STARTED"
    assert [r.sent_at for r in outbox_rows(handle.saga_id)] == [None]  # for the relay
    try:
        broker.start()
        with running(deployment, CELERY_BROKER_URL=broker.url, **FAST_RELAY):
            outcome = handle.wait(timeout=60)
    finally:
        broker.kill()
    assert outcome.state.value == "COMPLETED"
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["captured"]


@contextmanager
def worker_and_beat(deployment: Deployment, **env: Any) -> Iterator[list[CeleryProcess]]:
    full_env = {
        **deployment.env,
        "SAGAS_SCAN_INTERVAL": "0.5",
        **{k: str(v) for k, v in env.items()},
    }
    with ExitStack() as stack:
        worker = deployment.worker(name="redis-kill-worker", env=full_env, concurrency=4)
        beat = CeleryProcess(
            "workers.app", kind="beat", log_dir=deployment.log_dir / "redis-kill-beat",
            env=full_env, name="redis-kill-beat",
        )  # fmt: skip
        yield [stack.enter_context(worker), stack.enter_context(beat)]


UNRECOVERABLE = "Unrecoverable error"


def _supervised(processes: list[CeleryProcess]) -> None:
    """Restart a worker or beat that exited when its broker died (celery 5.7 sometimes
    does: see CELERY_NOTES.md), as a process supervisor would; one that logged kombu's
    unrecoverable error but did not exit (its warm shutdown waits) is killed first, as a
    liveness probe would."""
    for process in processes:
        since_start = process.log_text().rsplit("\n=== ", 1)[-1]
        if process.is_alive() and UNRECOVERABLE in since_start:
            process.kill()
        if not process.is_alive():
            process.start()


def test_orders_started_while_redis_is_killed_and_restarted_empty_all_finish(
    deployment: Deployment,
    caller: Callable[[str], SagaRuntime],
    fresh_sku: Callable[[int], str],
    tmp_path: Path,
) -> None:
    """200 orders at 40/s; Redis SIGKILLed after 3 s and back, empty, a second later.
    Every ``delay()`` that returned is a saga that settles; one that raised left nothing."""
    sku = fresh_sku(1000)
    accepted: list[tuple[dict[str, Any], Any]] = []
    refused: list[dict[str, Any]] = []
    # a step whose message died with Redis is re-sent by the scanner after a third of its
    # timeout: 10 s here (the default timeout, 300 s, would make this test wait 100 s)
    timeouts = {name: 30 for name in order_fulfillment.step_names}
    with redis_server(tmp_path / "redis") as broker:
        start = caller(broker.url, step_timeouts=timeouts).start_task("order_fulfillment")
        env = {"SAGAS_STEP_TIMEOUTS": json.dumps(timeouts), **FAST_RELAY}
        with worker_and_beat(deployment, CELERY_BROKER_URL=broker.url, **env) as processes:
            began = time.monotonic()
            for number in range(200):
                if number == 120:  # 3 s in
                    broker.kill()
                if number == 160:
                    broker.start()
                order = make_order(sku)
                try:
                    accepted.append((order, start.delay(order)))
                except Exception:
                    refused.append(order)
                time.sleep(max(0.0, began + (number + 1) / 40 - time.monotonic()))  # the rate

            def all_settled() -> bool:
                _supervised(processes)
                return all(h.outcome().settled for _, h in accepted)

            wait_until(all_settled, timeout=120, interval=0.5, message="every saga settled")
            outcomes = {o["order_id"]: h.outcome() for o, h in accepted}
    assert len(accepted) + len(refused) == 200
    assert len({o.saga_id for o in outcomes.values()}) == len(accepted)
    for order in refused:
        assert saga_by_key(order["order_id"]) is None
    for order_id, outcome in outcomes.items():
        payments = [p.status for p in rows_for(db.payments, order_id)]
        if outcome.state.value == "COMPLETED":
            assert payments == ["captured"], order_id
        else:  # a step that waited past its deadline behind the backlog: compensated
            assert outcome.state.value == "FAILED" and payments in ([], ["refunded"]), order_id
    completed = sum(o.state.value == "COMPLETED" for o in outcomes.values())
    assert completed >= 0.9 * len(accepted), f"only {completed} of {len(accepted)} completed"


# --------------------------------------------------------------------------- transactions

app_orders = sa.Table(
    "app_orders",
    sa.MetaData(),
    sa.Column("order_id", sa.Text, primary_key=True),
)


@pytest.fixture
def app_schema(deployment: Deployment) -> None:
    app_orders.create(db.get_engine(), checkfirst=True)


def _queued(broker_url: str) -> int:
    return int(redis.Redis.from_url(broker_url).llen("celery"))


def _app_order(order_id: str) -> list[Any]:
    with db.get_engine().connect() as conn:
        return list(conn.execute(sa.select(app_orders).where(app_orders.c.order_id == order_id)))


class Rollback(Exception):
    pass


def test_a_start_inside_a_transaction_that_rolls_back_leaves_nothing(
    caller: Callable[[str], SagaRuntime],
    app_schema: None,
    fresh_sku: Callable[[int], str],
    redis_url: str,
) -> None:
    start = caller(redis_url).start_task("order_fulfillment")
    order = make_order(fresh_sku(5))
    with pytest.raises(Rollback), db.get_engine().begin() as conn:
        conn.execute(app_orders.insert().values(order_id=order["order_id"]))
        handle = start.delay(order, connection=conn)
        assert handle.created
        raise Rollback
    assert _app_order(order["order_id"]) == []
    assert saga_by_key(order["order_id"]) is None
    assert outbox_rows(handle.saga_id) == []
    assert handle.publish() == 0  # rolled back: nothing to publish
    assert _queued(redis_url) == 0
    with Session(db.get_engine()) as session:
        session.execute(app_orders.insert().values(order_id=order["order_id"]))
        start.delay(order, connection=session)
        session.rollback()
    assert saga_by_key(order["order_id"]) is None
    assert _app_order(order["order_id"]) == []
    assert _queued(redis_url) == 0


def test_a_start_inside_a_transaction_that_commits_is_one_saga_published_after_commit(
    caller: Callable[[str], SagaRuntime],
    app_schema: None,
    fresh_sku: Callable[[int], str],
    redis_url: str,
) -> None:
    start = caller(redis_url).start_task("order_fulfillment")
    sku = fresh_sku(5)
    # a Session publishes when it commits
    order = make_order(sku)
    with Session(db.get_engine()) as session:
        session.execute(app_orders.insert().values(order_id=order["order_id"]))
        handle = start.delay(order, connection=session)
        assert _queued(redis_url) == 0  # not before the commit
        session.commit()
    assert _queued(redis_url) == 1
    assert saga_by_key(order["order_id"]).saga_id == handle.saga_id
    assert len(_app_order(order["order_id"])) == 1
    # a Connection has no after-commit event: publish() after commit (or the relay will)
    other = make_order(sku)
    with db.get_engine().begin() as conn:
        conn.execute(app_orders.insert().values(order_id=other["order_id"]))
        second = start.delay(other, connection=conn)
    assert _queued(redis_url) == 1
    assert second.publish() == 1 and _queued(redis_url) == 2
    assert second.state().value == "STARTED"
    with db.get_engine().connect() as conn:
        count = conn.execute(
            sa.select(sa.func.count())
            .select_from(sagas)
            .where(sagas.c.business_key.in_([order["order_id"], other["order_id"]]))
        ).scalar_one()
    assert count == 2


# --------------------------------------------------------------------------- concurrency


def _start_many(order: dict[str, Any], times: int) -> list[str]:
    """In a fresh process: ``times`` concurrent ``delay(order)`` calls; their saga ids."""
    from workers.orders import start_saga

    with ThreadPoolExecutor(times) as pool:
        return list(pool.map(lambda _: start_saga.delay(order).saga_id, range(times)))


def test_a_hundred_concurrent_starts_of_one_order_from_four_processes_are_one_saga(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    order = make_order(fresh_sku(5))
    with deployment.worker(name="concurrent-starts", quick_exit=True) as _worker:
        with multiprocessing.get_context("spawn").Pool(4) as pool:
            ids = [i for batch in pool.starmap(_start_many, [(order, 25)] * 4) for i in batch]
        assert len(ids) == 100
        assert len(set(ids)) == 1
        record = saga_by_key(order["order_id"])
        assert record is not None and record.saga_id == ids[0]
        with pytest.raises(PayloadConflictError, match="different payload"):
            start_saga.delay({**order, "items": [{"sku": "OTHER", "qty": 1, "price": 1}]})
        outcome = start_saga.delay(order).wait(timeout=60)  # the same order: the same saga
    assert outcome.saga_id == ids[0] and outcome.state.value == "COMPLETED"
    assert len(rows_for(db.payments, order["order_id"])) == 1


def test_an_invalid_or_oversized_order_raises_in_the_caller_and_writes_nothing(
    start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(1000):
        node["x"] = {}
        node = node["x"]
    bad = [
        make_order(fresh_sku(5), extra=deep),
        make_order(fresh_sku(5), order_id="x" * 10_000),
        make_order(fresh_sku(5), order_id="A\x00B"),
        make_order(fresh_sku(5), blob="y" * 70_000),
    ]
    for order in bad:
        with pytest.raises(InvalidPayloadError):
            start_saga.delay(order)
        if "\x00" not in order["order_id"]:  # no such id can be stored, or looked up
            assert saga_by_key(order["order_id"]) is None


# --------------------------------------------------------------------------- outcomes


@pytest.fixture(scope="module")
def outcome_worker(deployment: Deployment) -> Iterator[list[CeleryProcess]]:
    from tests.integration.test_dead_letters import FAST_REFUNDS

    with running(deployment, **FAST_REFUNDS) as processes:
        yield processes


def test_wait_returns_each_final_outcome_and_the_hooks_run_once(
    outcome_worker: list[CeleryProcess], start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    from workers.app import sagas as runtime

    sku = fresh_sku(10)
    completed = make_order(sku)
    failed = make_order(sku, simulate={"create_shipment": "fail"})
    stuck = make_order(sku, simulate={"create_shipment": "fail", "refund_payment": "fail"})
    handles = {name: start_saga.delay(o) for name, o in
               (("completed", completed), ("failed", failed), ("stuck", stuck))}  # fmt: skip

    done = handles["completed"].wait(timeout=60)
    assert done.state.value == "COMPLETED" and done.reason is None
    assert [s.status.value for s in done.steps] == ["completed"] * 4
    assert done.results["process_payment"]["amount"] == 1250
    assert done.results["create_shipment"]["shipment_id"]

    gone = handles["failed"].wait(timeout=60)
    assert gone.state.value == "FAILED" and "create_shipment" in (gone.reason or "")
    assert [s.status.value for s in gone.steps] == [
        "compensated",
        "compensated",
        "failed",
        "skipped",
    ]
    assert gone.steps[1].result["payment_id"]  # the original result is kept

    dead = handles["stuck"].wait(timeout=60)
    assert dead.state.value == "COMPENSATION_FAILED"
    assert dead.steps[1].status.value == "compensation_failed"

    # the same from anywhere, by saga id or business key
    assert runtime.get(handles["failed"].saga_id).outcome() == gone
    assert runtime.get(failed["order_id"], name="order_fulfillment").state().value == "FAILED"

    # hooks: once each, and none for a saga still waiting for an operator
    wait_until(lambda: outcome_rows(failed["order_id"]), timeout=30, message="on_failed ran")
    wait_until(lambda: outcome_rows(completed["order_id"]), timeout=30, message="on_completed")
    assert outcome_rows(completed["order_id"]) == [("on_completed", "COMPLETED")]
    assert outcome_rows(failed["order_id"]) == [("on_failed", "FAILED")]
    assert outcome_rows(stuck["order_id"]) == []


def test_an_operator_resolving_a_compensation_failed_saga_fires_on_failed_once(
    outcome_worker: list[CeleryProcess], start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    from celery_sagas import dlq
    from workers.app import sagas as runtime

    order = make_order(
        fresh_sku(10), simulate={"create_shipment": "fail", "refund_payment": "fail"}
    )
    handle = start_saga.delay(order)
    assert handle.wait(timeout=60).state.value == "COMPENSATION_FAILED"
    (entry,) = runtime.store.dead_letters(saga_id=handle.saga_id)
    result = dlq.discard(runtime.coordinator, entry.id, actor="test", reason="refunded by hand")
    runtime.publish(result.messages)
    assert handle.wait(timeout=30).state.value == "FAILED"
    wait_until(lambda: outcome_rows(order["order_id"]), timeout=30, message="on_failed ran")
    assert outcome_rows(order["order_id"]) == [("on_failed", "FAILED")]
