"""Failed compensations: retries with backoff, the dead-letter queue, the operator
commands (retry, discard, drain, cancel) — on PostgreSQL with Redis, and on RabbitMQ."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from celery_sagas.store import SqlSagaStore
from tests.conftest import require_service
from tests.integration.conftest import Deployment, make_order, rows_for
from tests.integration.test_deadlines import running
from tests.support.processes import CeleryProcess, wait_until
from workers import db

BACKOFF = {"max_retries": 2, "backoff_base": 0.4, "backoff_cap": 5, "jitter": 0}
FAST_REFUNDS = {"SAGAS_RETRY_POLICIES": json.dumps({"refund_payment": BACKOFF})}


def store() -> SqlSagaStore:
    return SqlSagaStore(db.database_url())


def cli(deployment: Deployment, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_sagas.cli", "--app", "workers.app", *args],
        capture_output=True,
        text=True,
        env={**deployment.env, **FAST_REFUNDS, "PATH": "/usr/bin:/bin", **env},
        timeout=120,
    )


# A CLI run is a fresh interpreter importing workers.app (~0.9 s, mostly CPU): runs that do
# not depend on each other go side by side, a few at a time.
PARALLEL = 3


def cli_all(
    deployment: Deployment, *calls: list[str], **env: str
) -> list[subprocess.CompletedProcess[str]]:
    """``cli(deployment, *args, **env)`` of every ``args`` at once; results in order. Only
    for runs that do not depend on each other."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(cli, deployment, *args, **env) for args in calls]
        return [future.result() for future in futures]


def failing_refund(sku: str, refund: str) -> dict[str, Any]:
    """An order whose shipment fails, so its payment must be refunded — and the refund
    fails (``fail``: always; ``transient:N``: the first N attempts)."""
    return make_order(sku, qty=2, simulate={"create_shipment": "fail", "refund_payment": refund})


def wait_state(key: str, state: str, timeout: float = 30) -> Any:
    def reached() -> Any:
        record = store().find(key)
        return record if record is not None and record.state.value == state else None

    return wait_until(reached, timeout=timeout, interval=0.1, message=f"{key} {state}")


@contextmanager
def dlq_worker(deployment: Deployment) -> Iterator[CeleryProcess]:
    with running(deployment, **FAST_REFUNDS) as processes:
        yield processes[0]


def test_a_compensation_that_always_fails_lands_in_the_dead_letter_queue(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(10)
    order = failing_refund(sku, "fail")
    depth = redis.Redis.from_url(deployment.broker_url)
    depth.delete("sagas.dlq")
    with dlq_worker(deployment):
        start_saga.delay(order)
        record = wait_state(order["order_id"], "COMPENSATION_FAILED")
        wait_until(lambda: depth.llen("sagas.dlq") == 1, timeout=10, message="DLQ message")
    attempts = store().attempts(f"{record.saga_id}:process_payment:compensation")
    assert [a.attempt for a in attempts] == [1, 2, 3]  # max_retries + 1
    gaps = [(b.at - a.at).total_seconds() for a, b in itertools.pairwise(attempts)]
    for gap, expected in zip(gaps, [0.4, 0.8], strict=True):
        assert expected - 0.05 <= gap <= expected + 0.6, gaps
    entries = store().dead_letters(saga_id=record.saga_id, status="all")
    assert len(entries) == 1
    entry = entries[0]
    assert (entry.status, entry.step_name, entry.attempts) == ("dead", "process_payment", 3)
    assert entry.task_name == "order_fulfillment.refund_payment"
    assert "simulated compensation failure" in (entry.error or "")
    assert "Traceback" in (entry.traceback or "")
    assert entry.payload["payment"]["card_number"] == "***"  # secrets redacted
    assert depth.llen("sagas.dlq") == 1
    # reverse order is never broken: the earlier compensation waits
    assert [s.status.value for s in record.steps[:2]] == ["completed", "compensation_failed"]
    assert db.stock(sku) == 8


def test_drain_resolves_a_transient_failure_and_the_saga_ends_failed(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(10)
    order = failing_refund(sku, "transient:3")  # dies after 3 attempts, the 4th works
    redis.Redis.from_url(deployment.broker_url).delete("sagas.dlq")
    with dlq_worker(deployment):
        start_saga.delay(order)
        record = wait_state(order["order_id"], "COMPENSATION_FAILED")
        dry = cli(deployment, "dlq", "drain", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert record.saga_id in dry.stdout
        assert store().dead_letters(saga_id=record.saga_id)[0].status == "dead"
        drained = cli(deployment, "dlq", "drain", "--limit", "50", "--wait", "30", "--json")
        final = wait_state(order["order_id"], "FAILED")
    rows = {e["saga_id"]: e for e in json.loads(drained.stdout)}
    assert rows[record.saga_id]["status"] == "resolved"
    # the session database may hold other tests' entries that are dead for good
    all_resolved = all(r["status"] == "resolved" for r in rows.values())
    assert drained.returncode == (0 if all_resolved else 1), drained.stderr
    assert "resolved" in drained.stderr
    log = store().transitions(record.saga_id)
    undone = [t.step for t in log if t.new == "compensated"]
    assert undone == ["process_payment", "reserve_inventory"]
    retry = [t for t in log if t.actor != "coordinator"]
    assert retry and "drained from the DLQ" in (retry[0].reason or "")
    assert db.stock(sku) == 10
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["refunded"]
    assert final.steps[1].compensation_attempts == 4


def test_discard_with_a_reason_and_retry_twice_is_one_compensation(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(10)
    discarded, retried = failing_refund(sku, "fail"), failing_refund(sku, "transient:3")
    with dlq_worker(deployment):
        start_saga.delay(discarded)
        start_saga.delay(retried)
        first = wait_state(discarded["order_id"], "COMPENSATION_FAILED")
        second = wait_state(retried["order_id"], "COMPENSATION_FAILED")
        entry = store().dead_letters(saga_id=first.saga_id)[0]
        done = cli(deployment, "dlq", "discard", str(entry.id), "--reason", "refunded by phone")
        assert done.returncode == 0, done.stderr
        wait_state(discarded["order_id"], "FAILED")

        other = store().dead_letters(saga_id=second.saga_id)[0]
        once = cli(deployment, "dlq", "retry", str(other.id), "--reason", "refund API is back")
        twice = cli(deployment, "dlq", "retry", str(other.id))
        wait_state(retried["order_id"], "FAILED")
    assert once.returncode == 0 and "re-sent" in once.stdout
    assert twice.returncode == 0 and "nothing done" in twice.stdout
    assert_operator_views(deployment, entry.id, discarded["order_id"], "refunded by phone")
    reasons = [t.reason or "" for t in store().transitions(first.saga_id)]
    assert any("refunded by phone" in r for r in reasons)
    assert store().dead_letter(entry.id).status == "discarded"
    assert store().dead_letter(other.id).status == "resolved"
    attempts = store().attempts(f"{second.saga_id}:process_payment:compensation")
    assert len(attempts) == 3  # the three failures; the one retry succeeded: one compensation
    assert [p.status for p in rows_for(db.payments, retried["order_id"])] == ["refunded"]
    assert db.stock(sku) == 10


def assert_operator_views(deployment: Deployment, entry_id: int, key: str, reason: str) -> None:
    """``dlq show`` (text and JSON) and ``show``: payloads as JSON and redacted, the operator
    actions with their reasons, no Python reprs."""
    text, data, saga, saga_json = cli_all(
        deployment,
        ["dlq", "show", str(entry_id)],
        ["dlq", "show", str(entry_id), "--json"],
        ["show", key],
        ["show", key, "--json"],
    )
    for result in (text, data, saga, saga_json):
        assert result.returncode == 0, result.stderr
        assert "4111111111111111" not in result.stdout
        assert reason in result.stdout
    payload = text.stdout.split("payload", 1)[1].split("\nfailed attempts")[0]
    assert "{'" not in payload and "None" not in text.stdout.split("payload")[0]
    json.loads(payload.strip())  # the payload block is JSON
    entry = json.loads(data.stdout)
    assert entry["status"] == "discarded"
    assert any(reason in (a["reason"] or "") for a in entry["operator_actions"])
    shown = json.loads(saga_json.stdout)
    assert [d["id"] for d in shown["dead_letters"]] == [entry_id]
    assert any(reason in (a["reason"] or "") for a in shown["operator_actions"])
    assert "dead letters" in saga.stdout and "operator actions" in saga.stdout


BAD_OPERATOR_INPUT = [
    (["dlq", "show", "999999"], "no dead-letter entry 999999"),
    (["dlq", "retry", "999999"], "no dead-letter entry 999999"),
    (["dlq", "discard", "999999", "--reason", "x"], "no dead-letter entry 999999"),
    (["dlq", "drain", "--limit", "0"], "0 is not in the range"),
    (["dlq", "retry"], "give one entry ID or --all"),
    (["dlq", "discard", "1"], "Missing option '--reason'"),
]


@pytest.fixture(scope="module")
def bad_operator_runs(
    request: pytest.FixtureRequest, deployment: Deployment
) -> Iterator[tuple[list[Any], dict[tuple[str, ...], Future[subprocess.CompletedProcess[str]]]]]:
    """The dead letters as they were, and the CLI run of every selected case of
    ``test_bad_operator_input_is_refused_clearly``, started together on first use (no
    worker runs then, and none of them may change anything); each test waits for its own."""
    selected = [
        item.callspec.params["args"]
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.originalname == "test_bad_operator_input_is_refused_clearly"
        and item.module is request.module
    ]
    before = store().dead_letters(status="all", limit=10_000)
    with ThreadPoolExecutor(PARALLEL) as pool:
        yield before, {tuple(args): pool.submit(cli, deployment, *args) for args in selected}


@pytest.mark.parametrize(("args", "message"), BAD_OPERATOR_INPUT)
def test_bad_operator_input_is_refused_clearly(
    bad_operator_runs: tuple[list[Any], dict[tuple[str, ...], Future[Any]]],
    args: list[str],
    message: str,
) -> None:
    before, runs = bad_operator_runs
    result = runs[tuple(args)].result()
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert store().dead_letters(status="all", limit=10_000) == before


def test_no_database_is_a_clear_error(deployment: Deployment) -> None:
    unreachable = "postgresql+psycopg2://postgres@127.0.0.1:1/nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "celery_sagas.cli", "dlq", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "SAGAS_DATABASE_URL": unreachable},
    )
    assert result.returncode != 0
    assert "cannot reach the saga database" in result.stderr
    assert "Traceback" not in result.stderr


def test_cancel_compensates_a_running_saga_and_refuses_a_finished_one(
    deployment: Deployment, fresh_sku: Callable[[int], str], redis_url: str
) -> None:
    sku = fresh_sku(10)
    # the shipment hangs long enough for two CLI processes to start on a loaded machine
    # (with 3 s, a slow `cancel` came after it and found the saga a step further)
    running_order = make_order(sku, simulate={"create_shipment": "hang"}, hang_seconds=10)
    finished_order = make_order(sku)
    # a broker of its own: the worker is killed at the end (a warm shutdown would wait out
    # the hang, ~8 s) and the hung call's unacked message goes with this Redis DB
    broker = {"CELERY_BROKER_URL": redis_url}
    with running(deployment, **FAST_REFUNDS, **broker) as (worker, _beat):
        client = Celery(broker=redis_url)
        with client.connection_for_write(url=redis_url) as conn:
            for order in (running_order, finished_order):
                client.send_task("order_fulfillment.start", args=[order], connection=conn)
        wait_state(finished_order["order_id"], "COMPLETED")
        wait_until(
            lambda: store().find(running_order["order_id"]).current_step == 2,
            timeout=20,
            message="shipment running",
        )
        cancelled, refused = cli_all(
            deployment,
            ["cancel", running_order["order_id"], "--reason", "fraud"],
            ["cancel", finished_order["order_id"], "--reason", "too late"],
            **broker,
        )
        record = wait_state(running_order["order_id"], "FAILED")
        worker.kill()
    assert cancelled.returncode == 0, cancelled.stderr
    assert refused.returncode != 0 and "only a running saga can be cancelled" in refused.stderr
    assert "cancelled by" in (record.reason or "") and "fraud" in record.reason
    assert [s.status.value for s in record.steps] == [
        "compensated",
        "compensated",
        "compensated",
        "skipped",
    ]
    assert db.stock(sku) == 10 - 1
    assert store().find(finished_order["order_id"]).state.value == "COMPLETED"


def test_the_dead_letter_queue_on_rabbitmq(
    deployment: Deployment, fresh_sku: Callable[[int], str], rabbitmq_url: str
) -> None:
    require_service("rabbitmq")
    env = {"CELERY_BROKER_URL": rabbitmq_url}
    with Connection(rabbitmq_url) as conn:
        for name in ("celery", "sagas.dlq"):
            queue = conn.SimpleQueue(name)
            queue.clear()
            queue.close()
    order = failing_refund(fresh_sku(10), "transient:3")
    with running(deployment, **FAST_REFUNDS, **env):
        client = Celery(broker=rabbitmq_url)
        # CELERY_BROKER_URL (Redis, for this session) would win over broker=: be explicit
        with client.connection_for_write(url=rabbitmq_url) as conn:
            client.send_task("order_fulfillment.start", args=[order], connection=conn)
        record = wait_state(order["order_id"], "COMPENSATION_FAILED", timeout=60)

        def depth() -> int:
            with Connection(rabbitmq_url) as conn:
                channel = conn.channel()
                declared = channel.queue_declare("sagas.dlq", passive=True)
                channel.close()
                return int(declared.message_count)

        wait_until(lambda: depth() == 1, timeout=10, message="one message in the RabbitMQ DLQ")
        drained = cli(deployment, "dlq", "drain", "--wait", "30", "--json", **env)
        rows = {e["saga_id"]: e for e in json.loads(drained.stdout)}
        assert rows[record.saga_id]["status"] == "resolved", drained.stderr
        # other tests' entries that fail for good die again: one DLQ message each, no more
        dead_again = sum(r["status"] == "dead" for r in rows.values())
        wait_until(lambda: depth() == dead_again, timeout=20, message="DLQ depth after drain")
        wait_state(order["order_id"], "FAILED", timeout=30)
    assert store().dead_letters(saga_id=record.saga_id, status="all")[0].status == "resolved"
