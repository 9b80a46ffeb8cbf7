"""The example deployment under test: one PostgreSQL database and one Redis DB for the
session, the schema migrated, stock seeded, and ``workers.app`` imported in this process
pointed at them (so tests call ``start_saga.delay(order)`` like application code)."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from tests.conftest import require_service
from tests.support.databases import (
    create_pg_database,
    drop_pg_database,
    redis_test_url,
    release_redis_db,
)
from tests.support.processes import CeleryProcess, wait_until

SETTLED = {"COMPLETED", "FAILED", "COMPENSATION_FAILED"}


@dataclass
class Deployment:
    database_url: str
    broker_url: str
    log_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "SAGAS_DATABASE_URL": self.database_url,
            "CELERY_BROKER_URL": self.broker_url,
            "SAGAS_RELAY_INTERVAL": "0.5",
            "SAGAS_RELAY_AFTER": "2",
        }

    def worker(
        self, app: str = "workers.app", *, quick_exit: bool = False, **kwargs: Any
    ) -> CeleryProcess:
        """A worker of the deployment; ``quick_exit``: leaving its ``with`` block without an
        error SIGKILLs it if it is idle (:func:`kill_if_idle`) instead of a warm shutdown."""
        kwargs.setdefault("pool", "prefork")
        kwargs.setdefault("concurrency", 2)
        kwargs.setdefault("log_dir", self.log_dir)
        kwargs.setdefault("env", self.env)
        return (QuickExitWorker if quick_exit else CeleryProcess)(app, **kwargs)


class QuickExitWorker(CeleryProcess):
    """Stopped by :func:`kill_if_idle` when its ``with`` block ends without an error."""

    def __exit__(self, *exc_info: Any) -> None:
        if exc_info[0] is None:
            kill_if_idle(self, self.env.get("CELERY_BROKER_URL", ""))
        self.stop()


def kill_if_idle(worker: CeleryProcess, broker_url: str) -> None:
    """SIGKILL ``worker`` if it answers that it runs no task; else leave it to the warm
    shutdown, which lets a running task finish (a test may assert that a late call did
    nothing). An idle prefork worker's warm shutdown still takes ~2.5 s (billiard joins its
    pool), and what it does besides (put its reserved messages back on the broker, where
    the next test's worker would get them) no test looks at: killed, they stay unacked,
    out of sight for the visibility timeout (1 h). Asked on the session's broker only (a
    reply on another broker is not collected here); no answer within 2 s: warm shutdown."""
    if not worker.is_alive() or not worker.hostname:
        return
    if broker_url != os.environ.get("CELERY_BROKER_URL"):
        return
    client = Celery(set_as_current=False)  # CELERY_BROKER_URL: the session's broker
    try:
        with warnings.catch_warnings():
            # the lowest kombu (make test-lowest) calls redis-py in a way newer redis-py
            # deprecates: a warning the suite's filterwarnings=error would turn into a failure
            warnings.simplefilter("ignore", DeprecationWarning)
            replies = client.control.inspect(destination=[worker.hostname], timeout=2.0).active()
    finally:
        client.close()
    if (replies or {}).get(worker.hostname) == []:
        worker.kill()


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    require_service("postgresql")
    require_service("redis")
    database_url = create_pg_database("sagas_e2e")
    broker_url = redis_test_url()
    saved = {k: os.environ.get(k) for k in ("SAGAS_DATABASE_URL", "CELERY_BROKER_URL")}
    os.environ["SAGAS_DATABASE_URL"] = database_url
    os.environ["CELERY_BROKER_URL"] = broker_url
    from celery_sagas.store import upgrade
    from workers import choreography, db

    db.reset_engine()
    upgrade(database_url)
    choreography.create_tables()  # the participants' tables and the services' outbox
    yield Deployment(database_url, broker_url, tmp_path_factory.mktemp("celery"))
    db.reset_engine()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    release_redis_db(broker_url)
    drop_pg_database(database_url)


@pytest.fixture(scope="session")
def start_saga(deployment: Deployment) -> Any:
    from workers.orders import start_saga

    return start_saga


def make_order(sku: str, qty: int = 1, **extra: Any) -> dict[str, Any]:
    order: dict[str, Any] = {
        "order_id": f"T-{uuid.uuid4().hex[:12]}",
        "items": [{"sku": sku, "qty": qty, "price": 1250}],
        "payment": {"method": "card", "card_number": "4111111111111111"},
    }
    order.update(extra)
    return order


@pytest.fixture
def fresh_sku(deployment: Deployment) -> Callable[[int], str]:
    """A new SKU with the given stock, so tests never share inventory."""
    from workers import db

    def make(on_hand: int = 100) -> str:
        sku = f"SKU-{uuid.uuid4().hex[:10]}"
        db.seed_inventory({sku: on_hand})
        return sku

    return make


def saga_by_key(key: str) -> Any:
    from celery_sagas.store import SqlSagaStore

    return SqlSagaStore(os.environ["SAGAS_DATABASE_URL"]).find(key)


def wait_settled(keys: list[str], timeout: float = 60) -> dict[str, Any]:
    """Poll the saga table until every saga of ``keys`` is settled; returns records.

    On a timeout the assertion carries the ground truth of the sagas that did not settle
    (their rows, steps, outbox and guards) and the state of the broker's Redis DB."""

    def settled() -> dict[str, Any] | None:
        records = {key: saga_by_key(key) for key in keys}
        if all(r is not None and r.state.value in SETTLED for r in records.values()):
            return records
        return None

    try:
        return wait_until(settled, timeout=timeout, interval=0.1, message=f"sagas {keys} settled")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stuck_sagas_report(keys)}") from None


def stuck_sagas_report(keys: list[str]) -> str:
    """The rows of every saga of ``keys`` not settled, and the broker DB's queues."""
    lines: list[str] = []
    try:
        lines += _saga_rows_report(keys)
    except Exception as exc:  # a diagnosis must not hide the failure it explains
        lines.append(f"(saga rows unreadable: {exc!r})")
    try:
        lines += broker_report(os.environ["CELERY_BROKER_URL"])
    except Exception as exc:
        lines.append(f"(broker unreadable: {exc!r})")
    return "\n".join(lines)


def _saga_rows_report(keys: list[str]) -> list[str]:
    from celery_sagas.store.tables import guards, outbox, sagas, steps
    from workers import db

    lines = []
    with db.get_engine().connect() as conn:
        for key in keys:
            saga = conn.execute(select(sagas).where(sagas.c.business_key == key)).first()
            if saga is None:
                lines.append(f"saga {key}: no row")
                continue
            if saga.state in SETTLED:
                continue
            lines.append(
                f"saga {key} id={saga.id} state={saga.state} current_step={saga.current_step} "
                f"token={saga.token} version={saga.version} updated_at={saga.updated_at} "
                f"due_at={saga.due_at} reason={saga.reason!r}"
            )
            for step in conn.execute(
                select(steps).where(steps.c.saga_id == saga.id).order_by(steps.c.idx)
            ):
                lines.append(
                    f"  step {step.idx} {step.name}: {step.status} attempts={step.attempts} "
                    f"dispatches={step.dispatches} started_at={step.started_at} "
                    f"deadline_at={step.deadline_at} redispatch_at={step.redispatch_at}"
                )
            for row in conn.execute(
                select(outbox).where(outbox.c.saga_id == saga.id).order_by(outbox.c.id)
            ):
                kind = row.body.get("kind") if isinstance(row.body, dict) else None
                lines.append(
                    f"  outbox {row.id} {kind} key={row.key} "
                    f"created_at={row.created_at} sent_at={row.sent_at}"
                )
            for guard in conn.execute(
                select(guards).where(guards.c.key.like(f"{saga.id}:%")).order_by(guards.c.key)
            ):
                lines.append(f"  guard {guard.key}: {guard.outcome} at {guard.recorded_at}")
    return lines


def broker_report(broker_url: str) -> list[str]:
    """Who leases the broker's Redis DB (another test run?), its queues and unacked count."""
    import redis

    from tests.support.databases import held_redis_dbs, lease_holder

    db = int(broker_url.rsplit("/", 1)[1])
    client = redis.Redis.from_url(broker_url, decode_responses=True, socket_timeout=5)
    try:
        lines = [
            f"broker {broker_url}: lease holder {lease_holder(db)!r}, "
            f"held by this process: {db in held_redis_dbs()}"
        ]
        for name in sorted(client.scan_iter(count=1000)):
            kind = client.type(name)
            if kind == "list":
                lines.append(f"  list {name}: {client.llen(name)}")
            elif kind == "hash":
                lines.append(f"  hash {name}: {client.hlen(name)}")
            elif kind == "set":
                lines.append(f"  set {name}: {sorted(client.smembers(name))}")
        return lines
    finally:
        client.close()


def rows_for(table: Any, order_id: str) -> list[Any]:
    from workers import db

    with db.get_engine().connect() as conn:
        return list(conn.execute(select(table).where(table.c.order_id == order_id)))
