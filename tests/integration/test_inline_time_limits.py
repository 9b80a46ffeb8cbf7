"""``inline_steps`` with timed steps: in a prefork pool child the worker gives each step of
an inline run its own time limits (``integration.alarm``), so steps with a timeout run in
one delivery too. Real workers on a Redis DB of the test's own and PostgreSQL; the
participants' own tables are the ground truth.

- timed steps run in one delivery per saga, and a run longer than any one step's timeout
  is not a timeout when each step is within its own;
- a step that hangs inline is interrupted at its own timeout (soft), one that swallows
  that at timeout + grace (hard): either is timed out and compensated, in the same
  delivery, and the pool child lives on;
- under threads (no alarm) the same timed steps are published, one delivery each.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from celery_sagas.store import SqlSagaStore
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.integration.test_untimed_liveness import start
from workers import db

APP = "tests.integration.inline_app"
STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")
TIMEOUT = 3.0
GRACE = 1.0


def settings(deployment: Deployment, broker: str) -> dict[str, str]:
    return {
        **deployment.env,
        "CELERY_BROKER_URL": broker,
        "INLINE_APP_TIMEOUT": str(TIMEOUT),
        "SAGAS_TIME_LIMIT_GRACE": str(GRACE),
    }


def received(log: str, task: str) -> int:
    return len(re.findall(rf"inline_orders\.{task}\[[0-9a-f-]+\] received", log))


def transitions(store: SqlSagaStore, saga_id: str) -> list[tuple[str | None, str]]:
    return [(t.step, t.new) for t in store.transitions(saga_id)]


def test_timed_steps_run_in_one_delivery_each_within_their_own_limits(
    deployment: Deployment, redis_url: str, fresh_sku: Callable[[int], str]
) -> None:
    """Three orders, one whose first two steps take 2 s each: 4 s in one delivery, past
    the 3 s of any one step, yet no step is past its own."""
    env = settings(deployment, redis_url)
    sku = fresh_sku(10)
    quick = [make_order(sku, qty=1) for _ in range(2)]
    slow = make_order(
        sku, qty=1, simulate={"reserve_inventory": "slow:2", "process_payment": "slow:2"}
    )
    orders = [*quick, slow]
    with deployment.worker(APP, env=env, name="timed-inline", concurrency=2) as worker:
        for order in orders:
            start(env, order)
        records = wait_settled([o["order_id"] for o in orders], timeout=60)
        log = worker.log_text()
    for order in orders:
        record = records[order["order_id"]]
        assert record.state.value == "COMPLETED", record
        assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["captured"]
        assert len(rows_for(db.shipments, order["order_id"])) == 1
    assert received(log, "reserve_inventory") == len(orders)
    for step in STEPS[1:]:
        assert received(log, step) == 0, step  # every later step ran inline
    assert "Hard time limit" not in log and "Soft time limit" not in log


@pytest.mark.parametrize(
    ("behaviour", "limit"), [("hang", "soft"), ("stubborn", "hard")], ids=["hung", "stubborn"]
)
def test_a_step_past_its_own_limit_inline_is_timed_out_and_compensated(
    behaviour: str,
    limit: str,
    deployment: Deployment,
    redis_url: str,
    fresh_sku: Callable[[int], str],
) -> None:
    env = settings(deployment, redis_url)
    sku = fresh_sku(5)
    order = make_order(sku, qty=1, simulate={"create_shipment": behaviour}, hang_seconds=60)
    store = SqlSagaStore(db.database_url())
    with deployment.worker(APP, env=env, name=f"timed-{behaviour}", concurrency=1) as worker:
        saga_id = start(env, order)
        record = wait_settled([order["order_id"]], timeout=40)[order["order_id"]]
        log = worker.log_text()
        children = worker.child_pids()
    assert record.state.value == "FAILED", record
    steps = transitions(store, saga_id)
    assert ("create_shipment", "timed_out") in steps, steps
    # compensated in reverse, the timed-out step too (it may have acted)
    undone = [step for step, new in steps if new == "compensated"]
    assert undone == ["create_shipment", "process_payment", "reserve_inventory"]
    # it hung before acting: at most its compensation's tombstone
    assert {s.status for s in rows_for(db.shipments, order["order_id"])} <= {"cancelled"}
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["refunded"]
    assert db.stock(sku) == 5
    timed_out = next(t for t in store.transitions(saga_id) if t.new == "timed_out")
    assert f"{limit} time limit ({TIMEOUT + (GRACE if limit == 'hard' else 0):g}s)" in (
        timed_out.reason or ""
    ), timed_out.reason
    # one delivery did it all, and its pool child was not replaced (nothing was killed)
    assert received(log, "reserve_inventory") == 1
    assert received(log, "create_shipment") == 0 and received(log, "cancel_shipment") == 0
    assert "Hard time limit" not in log and "exited with" not in log
    assert len(children) == 1


def test_under_threads_timed_steps_are_published(
    deployment: Deployment, redis_url: str, fresh_sku: Callable[[int], str]
) -> None:
    env = settings(deployment, redis_url)
    order = make_order(fresh_sku(5), qty=1)
    with deployment.worker(APP, env=env, name="timed-threads", pool="threads", concurrency=4) as w:
        start(env, order)
        record = wait_settled([order["order_id"]], timeout=40)[order["order_id"]]
        log = w.log_text()
    assert record.state.value == "COMPLETED", record
    for step in STEPS:
        assert received(log, step) == 1, step


def test_a_step_deaf_to_both_limits_is_ended_by_the_watchdog_and_recorded_as_itself(
    deployment: Deployment, redis_url: str, fresh_sku: Callable[[int], str]
) -> None:
    """A participant that swallows every interrupt (as a call stuck in C code would not
    see them): 1 s past its hard limit the watchdog records the step that was running
    inline (create_shipment) timed out and kills the pool child, long before the
    message's 13 s budget; the message comes back and finds the outcome recorded."""
    env = {
        **settings(deployment, redis_url),
        "INLINE_APP_TIMEOUT": "1",
        "SAGAS_TIME_LIMIT_GRACE": "0.5",
    }
    sku = fresh_sku(5)
    order = make_order(sku, qty=1, simulate={"create_shipment": "deaf"}, hang_seconds=40)
    store = SqlSagaStore(db.database_url())
    with deployment.worker(APP, env=env, name="timed-deaf", concurrency=1) as worker:
        saga_id = start(env, order)
        record = wait_settled([order["order_id"]], timeout=60)[order["order_id"]]
        log = worker.log_text()
    assert "killing process" in log and "Hard time limit" not in log
    assert record.state.value == "FAILED", record
    timed_out = [t for t in store.transitions(saga_id) if t.new == "timed_out"]
    assert [t.step for t in timed_out] == ["create_shipment"]
    reason = timed_out[0].reason or ""
    assert "past its hard time limit (1.5s)" in reason and "pool child was killed" in reason
    undone = [t.step for t in store.transitions(saga_id) if t.new == "compensated"]
    assert undone == ["create_shipment", "process_payment", "reserve_inventory"]
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["refunded"]
    assert db.stock(sku) == 5


def test_under_gevent_a_hung_timed_step_gets_its_own_hard_limit_not_the_budget(
    deployment: Deployment, redis_url: str, fresh_sku: Callable[[int], str]
) -> None:
    """Each message carries a budget as its limit; a gevent worker (no alarm: nothing
    timed runs inline) still ends the step at its own timeout + grace, as Celery's gevent
    pool would have, not at the budget."""
    env = settings(deployment, redis_url)
    sku = fresh_sku(5)
    order = make_order(sku, qty=1, simulate={"create_shipment": "hang"}, hang_seconds=60)
    store = SqlSagaStore(db.database_url())
    with deployment.worker(APP, env=env, name="timed-gevent", pool="gevent", concurrency=10) as w:
        saga_id = start(env, order)
        record = wait_settled([order["order_id"]], timeout=40)[order["order_id"]]
        log = w.log_text()
    assert record.state.value == "FAILED", record
    timed_out = [t for t in store.transitions(saga_id) if t.new == "timed_out"]
    assert [t.step for t in timed_out] == ["create_shipment"]
    assert f"hard time limit ({TIMEOUT + GRACE:g}s) exceeded" in (timed_out[0].reason or "")
    assert received(log, "create_shipment") == 1  # published: nothing timed runs inline
    assert db.stock(sku) == 5


def test_a_worker_with_a_time_limit_of_its_own_still_times_each_step_by_its_own(
    deployment: Deployment, redis_url: str, fresh_sku: Callable[[int], str]
) -> None:
    """``celery worker --time-limit``: the step messages' budgets override it (a message's
    limits are Celery's for its delivery), so refusing to divide them left a hung step
    running until the budget (25 s here) instead of its own 3 s timeout."""
    env = settings(deployment, redis_url)
    order = make_order(fresh_sku(5), qty=1, simulate={"create_shipment": "hang"}, hang_seconds=60)
    store = SqlSagaStore(db.database_url())
    with deployment.worker(
        APP, env=env, name="timed-worker-limit", concurrency=1, extra_args=["--time-limit", "600"]
    ):
        saga_id = start(env, order)
        record = wait_settled([order["order_id"]], timeout=60)[order["order_id"]]
    assert record.state.value == "FAILED", record
    timed_out = next(t for t in store.transitions(saga_id) if t.new == "timed_out")
    assert f"soft time limit ({TIMEOUT:g}s)" in (timed_out.reason or ""), timed_out.reason


def test_a_timed_step_after_an_untimed_one_keeps_celerys_hard_limit(
    deployment: Deployment, redis_url: str, fresh_sku: Callable[[int], str]
) -> None:
    """An untimed first step's delivery has no Celery limit. A timed step run inline in
    it has only the alarm, which a participant deaf to it (a call stuck in C code) never
    heeds: nothing replaces its pool child. Published, under its budget, Celery's hard
    limit does, and the step is timed out and compensated."""
    env = {**settings(deployment, redis_url), "INLINE_APP_UNTIMED": "reserve_inventory"}
    order = make_order(fresh_sku(5), qty=1, simulate={"create_shipment": "deaf"}, hang_seconds=90)
    store = SqlSagaStore(db.database_url())
    with deployment.worker(APP, env=env, name="timed-after-untimed", concurrency=2) as worker:
        saga_id = start(env, order)
        record = wait_settled([order["order_id"]], timeout=60)[order["order_id"]]
        log = worker.log_text()
    assert record.state.value == "FAILED", record
    steps = transitions(store, saga_id)
    assert ("create_shipment", "timed_out") in steps, steps
    # the watchdog (the step's own hard limit + 1 s) replaced the deaf step's child
    assert "killing process" in log
