"""Steps without a timeout have a backstop on Redis too. Real prefork workers, a real beat,
a Redis DB of the test's own (its visibility timeout left at one hour, so a killed
worker's message does not come back within the test) and PostgreSQL; the participants'
own tables are the ground truth. Each test runs in the default mode and with
``inline_steps``.

- A step message Redis lost before any worker took it is re-sent by the scan after
  ``resend_untimed_after``.
- A worker SIGKILLed (the whole worker, not a pool child) in the middle of an untimed step
  stops beating: the scan re-sends the step once three ``heartbeat_interval``s passed, and a
  new worker finishes the saga.
- A step running longer than that lease keeps beating and is never re-sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import redis

from celery_sagas.store import SqlSagaStore
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.support.processes import REPO_ROOT, CeleryProcess, wait_until
from workers import db

APP = "tests.integration.inline_app"
QUEUE = "inline"
STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")
BEAT = 0.5  # heartbeat interval: a step is silent after 1.5 s without a beat
MODES = pytest.mark.parametrize("inline", [False, True], ids=["default", "inline"])


def settings(deployment: Deployment, broker: str, inline: bool) -> dict[str, str]:
    return {
        **deployment.env,
        "CELERY_BROKER_URL": broker,
        "INLINE_APP_INLINE": "1" if inline else "0",
        "SAGAS_SCAN_INTERVAL": "0.5",
        "SAGAS_RESEND_UNTIMED_AFTER": "1",
        "SAGAS_HEARTBEAT_INTERVAL": str(BEAT),
    }


def start(env: dict[str, str], order: dict[str, Any]) -> str:
    """The caller's durable start, in a process of its own on the test's broker; returns
    the saga id once its first step's message is published."""
    script = (
        "import json, sys\n"
        "from tests.integration.inline_app import sagas\n"
        "handle = sagas.start('inline_orders', json.loads(sys.argv[1]))\n"
        "print(handle.saga_id)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(order)],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


@contextmanager
def deployed(
    deployment: Deployment, env: dict[str, str], name: str, worker: bool = True
) -> Iterator[tuple[CeleryProcess | None, CeleryProcess]]:
    """A beat (the scan) and, unless ``worker=False``, one prefork worker."""
    with ExitStack() as stack:
        beat = CeleryProcess(
            APP,
            kind="beat",
            log_dir=deployment.log_dir / name,
            env=env,
            name=f"{name}-beat",
            loglevel="DEBUG",
        )
        stack.enter_context(beat)
        found = None
        if worker:
            found = stack.enter_context(
                deployment.worker(APP, env=env, name=f"{name}-worker", concurrency=2)
            )
        yield found, beat


def resends(store: SqlSagaStore, saga_id: str) -> list[tuple[str | None, str]]:
    return [
        (t.step, t.reason or "")
        for t in store.transitions(saga_id)
        if (t.reason or "").startswith("re-sent")
    ]


def assert_each_participant_acted_once(order: dict[str, Any], record: Any) -> None:
    assert record.state.value == "COMPLETED", record
    assert len(rows_for(db.reservations, order["order_id"])) == 1
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["captured"]
    assert len(rows_for(db.shipments, order["order_id"])) == 1
    assert len(rows_for(db.notifications, order["order_id"])) == 1


@MODES
def test_a_step_message_redis_lost_is_resent_by_the_scan(
    inline: bool,
    deployment: Deployment,
    redis_url: str,
    fresh_sku: Callable[[int], str],
) -> None:
    env = settings(deployment, redis_url, inline)
    order = make_order(fresh_sku(5), qty=1)
    saga_id = start(env, order)
    queued = redis.Redis.from_url(redis_url)
    assert queued.llen(QUEUE) == 1  # the first step's message, published
    queued.delete(QUEUE)  # lost, as with a Redis restarted without persistence
    store = SqlSagaStore(db.database_url())
    with deployed(deployment, env, f"lost-{inline}"):
        record = wait_settled([order["order_id"]], timeout=60)[order["order_id"]]
    assert_each_participant_acted_once(order, record)
    assert [step for step, _ in resends(store, saga_id)] == ["reserve_inventory"]


@MODES
def test_a_worker_killed_mid_step_stops_beating_and_the_step_is_resent(
    inline: bool,
    deployment: Deployment,
    redis_url: str,
    fresh_sku: Callable[[int], str],
) -> None:
    """The worker dies with the step's message unacknowledged (Redis would give it back
    only after its one-hour visibility timeout); the scan re-sends the step once its
    marker went unrefreshed for the lease, and the next worker completes the saga."""
    env = settings(deployment, redis_url, inline)
    order = make_order(fresh_sku(5), qty=1, simulate={"process_payment": "slow:3"})
    store = SqlSagaStore(db.database_url())
    with deployed(deployment, env, f"killed-{inline}") as (worker, _beat):
        assert worker is not None
        saga_id = start(env, order)
        key = f"{saga_id}:process_payment:action"
        wait_until(lambda: store.get_guard(key), timeout=30, message="process_payment began")
        worker.kill()  # SIGKILL to the worker's whole process group
        replacement = deployment.worker(APP, env=env, name=f"killed-{inline}-2", concurrency=2)
        with replacement:
            record = wait_settled([order["order_id"]], timeout=60)[order["order_id"]]
    assert_each_participant_acted_once(order, record)
    (resent,) = resends(store, saga_id)
    assert resent[0] == "process_payment"
    assert "no outcome after its time limit" in resent[1]


@MODES
def test_a_step_longer_than_the_lease_keeps_beating_and_is_not_resent(
    inline: bool,
    deployment: Deployment,
    redis_url: str,
    fresh_sku: Callable[[int], str],
) -> None:
    env = settings(deployment, redis_url, inline)
    order = make_order(fresh_sku(5), qty=1, simulate={"create_shipment": f"slow:{BEAT * 3 * 3}"})
    store = SqlSagaStore(db.database_url())
    with deployed(deployment, env, f"long-{inline}") as (worker, beat):
        assert worker is not None
        saga_id = start(env, order)
        record = wait_settled([order["order_id"]], timeout=60)[order["order_id"]]
        scans = beat.log_text().count("celery_sagas.scan")
    assert_each_participant_acted_once(order, record)
    assert resends(store, saga_id) == []
    assert scans >= 4, "the scan must have looked while the step ran"
