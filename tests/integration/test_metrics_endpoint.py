"""``/metrics`` after real sagas on real worker and beat processes (PostgreSQL + Redis), and
the stats reader's incremental folding against a full scan (PostgreSQL and SQLite).

The run gets a database and a Redis DB of its own: other tests leave sagas behind in the
session database that a worker and beat started here would move on, which would make the
numbers depend on test order. The exact numbers are deltas between a scrape before and a
scrape after the run, so they do not depend on what the database held before either.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, insert, update

from celery_sagas import metrics
from celery_sagas.stats import SagaStats, bucket_bounds
from celery_sagas.store import SqlSagaStore, upgrade
from celery_sagas.store.engine import build_engine
from celery_sagas.store.stats import StatsReader
from celery_sagas.store.tables import dead_letters, sagas, steps
from tests.integration.conftest import SETTLED, Deployment, make_order
from tests.integration.test_deadlines import running
from tests.support.processes import wait_until
from workers import db

SAGA = "order_fulfillment"
STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")
SHIPMENT_TIMEOUT = 1
FAST_REFUNDS = {"refund_payment": {"max_retries": 2, "backoff_base": 0.2, "jitter": 0}}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --------------------------------------------------------------------------- helpers


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before: Samples, after: Samples) -> Callable[..., float]:
    def change(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    return change


@pytest.fixture
def own_deployment(pg_database: str, redis_url: str, tmp_path: Path) -> Iterator[Deployment]:
    """A migrated database with the participants' tables and a Redis DB, for this test."""
    upgrade(pg_database)
    engine = build_engine(pg_database)
    db.create_tables(engine)
    engine.dispose()
    yield Deployment(pg_database, redis_url, tmp_path / "celery")


def stock_sku(url: str, on_hand: int = 100) -> str:
    sku = f"SKU-{uuid.uuid4().hex[:10]}"
    engine = build_engine(url)
    try:
        db.seed_inventory({sku: on_hand}, engine)
    finally:
        engine.dispose()
    return sku


def wait_all_settled(url: str, keys: list[str], timeout: float = 60) -> dict[str, Any]:
    store = SqlSagaStore(url)

    def settled() -> dict[str, Any] | None:
        records = {key: store.find(key) for key in keys}
        if all(r is not None and r.state.value in SETTLED for r in records.values()):
            return records
        return None

    return wait_until(settled, timeout=timeout, interval=0.2, message=f"{len(keys)} settled")


# --------------------------------------------------------------------------- the run


def test_metrics_after_successes_failures_a_timeout_and_a_dead_letter(
    own_deployment: Deployment,
) -> None:
    url = own_deployment.database_url
    budgets = {(SAGA, "create_shipment"): float(SHIPMENT_TIMEOUT)}
    reader = StatsReader(url, buckets=bucket_bounds(budgets.values()))
    server = metrics.serve(reader, "127.0.0.1", 0, step_budgets=budgets)
    sender = Celery("metrics-test", broker=own_deployment.broker_url)
    sku = stock_sku(url)
    orders = {
        "ok": [make_order(sku), make_order(sku)],
        "declined": [
            make_order(sku, payment={"method": "card_declined"}),
            make_order(sku, payment={"method": "card_declined"}),
        ],
        "timeout": [
            make_order(sku, simulate={"create_shipment": "hang"}, hang_seconds=4),
        ],
        "dead": [
            make_order(sku, simulate={"create_shipment": "fail", "refund_payment": "fail"}),
        ],
    }
    keys = [o["order_id"] for group in orders.values() for o in group]
    try:
        before = scrape(server.url)
        settings = {
            "SAGAS_STEP_TIMEOUTS": json.dumps({f"{SAGA}.create_shipment": SHIPMENT_TIMEOUT}),
            "SAGAS_RETRY_POLICIES": json.dumps(FAST_REFUNDS),
        }
        with running(own_deployment, **settings) as (worker, beat):
            # an explicit connection: CELERY_BROKER_URL in the environment (set by the
            # session deployment) would win over the app's broker setting
            with sender.connection_for_write(own_deployment.broker_url) as connection:
                for group in orders.values():
                    for order in group:
                        sender.send_task(f"{SAGA}.start", args=[order], connection=connection)
            try:
                records = wait_all_settled(url, keys)
            except AssertionError as exc:
                logs = f"worker:\n{worker.log_tail(80)}\nbeat:\n{beat.log_tail(20)}"
                raise AssertionError(f"{exc}\n{logs}") from exc
        after = scrape(server.url)
    finally:
        server.stop()
        sender.close()
        reader.engine.dispose()

    states = {key: record.state.value for key, record in records.items()}
    assert sorted(states.values()) == sorted(
        ["COMPLETED"] * 2 + ["FAILED"] * 3 + ["COMPENSATION_FAILED"]
    ), states
    change = delta(before, after)
    saga = {"saga": SAGA}

    assert change("celery_sagas_started_total", **saga) == 6
    assert change("celery_sagas_completed_total", **saga) == 2
    assert change("celery_sagas_failed_total", **saga) == 3
    assert change("celery_sagas_compensation_failed_total", **saga) == 1
    in_state = {
        "STARTED": 0,
        "PENDING": 0,
        "COMPENSATING": 0,
        "COMPLETED": 2,
        "FAILED": 3,
        "COMPENSATION_FAILED": 1,
    }
    for state, count in in_state.items():
        assert change("celery_sagas_in_state", state=state, **saga) == count, state
    # a COMPENSATION_FAILED saga waits for an operator: it is the DLQ's alert, not "stuck"
    assert after[("celery_sagas_oldest_unfinished_saga_age_seconds", frozenset(saga.items()))] == 0
    assert after[("celery_sagas_stuck", frozenset(saga.items()))] == 0
    took = "celery_sagas_duration_seconds_count"
    assert change(took, outcome="completed", **saga) == 2
    assert change(took, outcome="failed", **saga) == 3  # the dead-lettered one is not finished

    # every step that ran once: ok 2 x 4 steps, declined 2 x 2, timeout 3, dead 3
    ran = {"reserve_inventory": 6, "process_payment": 6, "create_shipment": 4}
    ran["send_confirmation"] = 2
    # undone: declined -> reserve; timeout -> shipment, payment, reserve; dead -> payment
    undone = {"reserve_inventory": 3, "process_payment": 2, "create_shipment": 1}
    undone["send_confirmation"] = 0
    for step in STEPS:
        labels = {"saga": SAGA, "step": step}
        assert change("celery_sagas_step_duration_seconds_count", **labels) == ran[step], step
        assert change("celery_sagas_step_duration_seconds_bucket", le="+Inf", **labels) == ran[step]
        assert (
            change("celery_sagas_compensation_duration_seconds_count", **labels) == undone[step]
        ), step
        assert change("celery_sagas_step_timeouts_total", **labels) == (
            1 if step == "create_shipment" else 0
        )
        assert change("celery_sagas_step_retries_total", role="action", **labels) == 0
        # the dead refund ran 3 times (max_retries=2): two retries
        assert change("celery_sagas_step_retries_total", role="compensation", **labels) == (
            2 if step == "process_payment" else 0
        )

    # the budget is a bucket bound: the timed-out shipment is the one above it
    shipment = {"saga": SAGA, "step": "create_shipment"}
    assert change("celery_sagas_step_duration_seconds_bucket", le="1.0", **shipment) == 3
    assert change("celery_sagas_step_duration_seconds_sum", **shipment) >= SHIPMENT_TIMEOUT
    assert after[("celery_sagas_step_timeout_budget_seconds", frozenset(shipment.items()))] == 1

    assert change("celery_sagas_dead_letters", status="dead") == 1
    assert change("celery_sagas_dead_letters", status="retrying") == 0
    assert change("celery_sagas_dlq_depth") == 1
    assert after[("celery_sagas_database_up", frozenset())] == 1
    assert change("celery_sagas_scrape_errors_total") == 0


def test_a_database_that_is_down_gives_a_clean_scrape() -> None:
    reader = StatsReader("postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
    server = metrics.serve(reader, "127.0.0.1", 0)
    try:
        first, second = scrape(server.url), scrape(server.url)
    finally:
        server.stop()
        reader.engine.dispose()
    assert first[("celery_sagas_database_up", frozenset())] == 0
    assert first[("celery_sagas_scrape_errors_total", frozenset())] == 1
    assert second[("celery_sagas_scrape_errors_total", frozenset())] == 2
    assert not [key for key in second if any(label == "saga" for label, _ in key[1])]


def test_the_exporter_starts_with_the_database_down_and_reports_it(tmp_path: Path) -> None:
    """``celery-sagas metrics`` itself (a subprocess): it serves ``database_up 0``."""
    import subprocess
    import sys

    unreachable = "postgresql+psycopg2://postgres@127.0.0.1:1/nowhere"
    log = tmp_path / "exporter.log"
    with log.open("w") as out:
        exporter = subprocess.Popen(
            [sys.executable, "-m", "celery_sagas.cli", "metrics", "--port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin", "SAGAS_DATABASE_URL": unreachable},
        )
    try:

        def served() -> str | None:
            found = [w for w in log.read_text().split() if w.startswith("http://")]
            assert exporter.poll() is None, log.read_text()
            return found[0] if found else None

        url = wait_until(served, timeout=30, interval=0.1, message="exporter serving")
        samples = scrape(url)
    finally:
        exporter.terminate()
        exporter.wait(10)
    assert samples[("celery_sagas_database_up", frozenset())] == 0
    assert "cannot read saga stats" in log.read_text()


# --------------------------------------------------------------------------- folding

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def add_saga(engine: Engine, state: str, created: datetime, finished: bool = False) -> str:
    saga_id = uuid.uuid4().hex
    done = created + timedelta(seconds=2) if finished else None
    with engine.begin() as conn:
        conn.execute(
            insert(sagas).values(
                id=saga_id,
                name=SAGA,
                business_key=saga_id,
                payload={},
                payload_hash="x",
                state=state,
                current_step=0,
                token=1,
                version=1,
                created_at=created,
                updated_at=created,
                finished_at=done,
            )
        )
        for idx, step in enumerate(STEPS[:2]):
            conn.execute(
                insert(steps).values(
                    saga_id=saga_id,
                    idx=idx,
                    name=step,
                    status="completed" if finished else "running",
                    attempts=2 if finished else 0,
                    started_at=created,
                    finished_at=created + timedelta(seconds=0.3 + idx) if finished else None,
                )
            )
    return saga_id


def finish(engine: Engine, saga_id: str, state: str, at: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(update(sagas).where(sagas.c.id == saga_id).values(state=state, finished_at=at))
        conn.execute(
            update(steps)
            .where(steps.c.saga_id == saga_id)
            .values(
                status="compensated",
                attempts=3,
                error_kind="timeout",
                finished_at=at - timedelta(seconds=1),
                compensation_started_at=at - timedelta(seconds=0.5),
                compensation_finished_at=at,
                compensation_attempts=2,
            )
        )


def rounded(stats: SagaStats) -> SagaStats:
    """Sums of floats differ in the last bits with the order of addition."""
    from dataclasses import replace

    return replace(
        stats,
        steps={
            key: replace(
                s,
                durations=replace(s.durations, total=round(s.durations.total, 6)),
                compensation_durations=replace(
                    s.compensation_durations, total=round(s.compensation_durations.total, 6)
                ),
            )
            for key, s in stats.steps.items()
        },
        durations={k: replace(h, total=round(h.total, 6)) for k, h in stats.durations.items()},
    )


@pytest.fixture(params=["postgresql", "sqlite"])
def saga_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+pysqlite:///{tmp_path / 'stats.sqlite3'}"
    else:
        yield request.getfixturevalue("pg_database")


def test_incremental_stats_equal_a_full_scan_as_sagas_move(saga_database: str) -> None:
    upgrade(saga_database)
    engine = build_engine(saga_database)
    clock = Clock()
    incremental = StatsReader(engine, settle_after=10, clock=clock)
    full = StatsReader(engine, settle_after=None, clock=clock)
    chunked = StatsReader(engine, settle_after=10, fold_batch=1, clock=clock)

    def same() -> SagaStats:
        got, expected = rounded(incremental()), rounded(full())
        assert got == expected
        assert rounded(chunked()) == expected
        return got

    for _ in range(3):  # three at the same instant: chunk bounds must not split or stall
        add_saga(engine, "COMPLETED", T0 - timedelta(hours=2), finished=True)
    old_done = add_saga(engine, "COMPLETED", T0 - timedelta(hours=1), finished=True)
    old_live = add_saga(engine, "PENDING", T0 - timedelta(hours=1))
    new_live = add_saga(engine, "PENDING", T0 - timedelta(seconds=1))
    first = same()
    assert incremental._pending == {old_live}
    assert first.oldest_unfinished_age == {SAGA: 3600.0}
    assert first.states[SAGA] == {"COMPLETED": 4, "PENDING": 2}
    assert first.stuck == {SAGA: 1}  # the hour-old PENDING one (stuck_after 600 s)
    assert first.durations[(SAGA, "completed")].count == 4

    clock.now += timedelta(minutes=5)
    finish(engine, old_live, "FAILED", clock.now)
    finish(engine, new_live, "COMPENSATION_FAILED", clock.now)
    with engine.begin() as conn:  # COMPENSATION_FAILED stays unfinished (finished_at NULL)
        conn.execute(update(sagas).where(sagas.c.id == new_live).values(finished_at=None))
        conn.execute(
            insert(dead_letters).values(
                saga_id=new_live,
                saga_name=SAGA,
                step=1,
                step_name="process_payment",
                task_name="order_fulfillment.refund_payment",
                status="dead",
                payload={},
                created_at=clock.now,
                updated_at=clock.now,
            )
        )
    newest = add_saga(engine, "COMPLETED", clock.now - timedelta(seconds=1), finished=True)
    second = same()
    assert incremental._pending == {new_live}
    assert second.states[SAGA] == {"COMPLETED": 5, "FAILED": 1, "COMPENSATION_FAILED": 1}
    assert second.compensation_failed == {SAGA: 1}
    assert second.dead_letters == {"dead": 1}
    assert second.oldest_unfinished_age == {}
    assert second.stuck == {}
    assert second.durations[(SAGA, "completed")].count == 5
    assert second.durations[(SAGA, "failed")].count == 1
    payment = second.steps[(SAGA, "process_payment")]
    assert payment.timeouts == 2 and payment.compensation_retries == 2
    assert payment.retries == 3 + 1 + 2 + 2 + 1  # attempts 2 (x3), 2, 3, 3 and 2

    clock.now += timedelta(minutes=5)
    with engine.begin() as conn:  # an operator resolved it: the saga is FAILED at last
        conn.execute(
            update(sagas).where(sagas.c.id == new_live).values(state="FAILED", finished_at=T0)
        )
        conn.execute(update(dead_letters).values(status="resolved"))
    third = same()
    assert incremental._pending == frozenset()
    assert third.compensation_failed == {SAGA: 1}  # a counter: it never goes down
    assert third.states[SAGA] == {"COMPLETED": 5, "FAILED": 2}
    assert newest not in incremental._pending and old_done not in incremental._pending
    engine.dispose()
