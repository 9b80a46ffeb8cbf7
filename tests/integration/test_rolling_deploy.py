"""Two versions of the order saga at once: a worker of the older deploy (version 1) and one
of the newer (versions 1 and 2) on the same broker. Sagas started on version 1 finish on
it; new starts run version 2 (five steps), which the older worker never touches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from celery_sagas.store import SqlSagaStore
from celery_sagas.store.stats import StatsReader
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.support.processes import CeleryProcess
from workers import db

APP = "tests.integration.versioned_app"
ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def two_deploys(deployment: Deployment) -> Iterator[tuple[CeleryProcess, CeleryProcess]]:
    with ExitStack() as stack:
        old, new = (
            stack.enter_context(
                deployment.worker(
                    APP,
                    name=f"deploy-{name}",
                    env={**deployment.env, "SAGA_VERSIONS": versions},
                    concurrency=1,
                )
            )
            for name, versions in (("old", "1"), ("new", "1,2"))
        )
        yield old, new


def test_sagas_finish_on_the_version_they_started_with(
    deployment: Deployment, fresh_sku: Callable[[int], str]
) -> None:
    from tests.integration.versioned_app import ORDER_V2, make_app
    from workers.sagas import order_fulfillment

    _, old_runtime = make_app("1")
    _, new_runtime = make_app("1,2")
    sku = fresh_sku(20)
    v1_orders = [make_order(sku) for _ in range(4)]
    v2_orders = [make_order(sku) for _ in range(4)]

    def start(runtime: Any, order: dict[str, Any]) -> None:
        started = runtime.coordinator.start("order_fulfillment", order)
        runtime.publish(started.messages)

    with two_deploys(deployment) as (old, new):
        for v1, v2 in zip(v1_orders, v2_orders, strict=True):
            start(old_runtime, v1)  # what the older deploy's application starts
            start(new_runtime, v2)  # the newer deploy's: the newest version
        records = wait_settled([o["order_id"] for o in v1_orders + v2_orders], timeout=90)
        old_log, new_log = old.log_text(), new.log_text()

    store = SqlSagaStore(db.database_url())
    for order in v1_orders:
        record = records[order["order_id"]]
        assert record.state.value == "COMPLETED", store.transitions(record.saga_id)
        assert record.definition == order_fulfillment.fingerprint
        assert len(record.steps) == 4
        kinds = [n.kind for n in rows_for(db.notifications, order["order_id"])]
        assert kinds == ["confirmation"]
    for order in v2_orders:
        record = records[order["order_id"]]
        assert record.state.value == "COMPLETED", store.transitions(record.saga_id)
        assert record.definition == ORDER_V2.fingerprint
        assert [s.name for s in record.steps][-1] == "record_audit"
        kinds = sorted(n.kind for n in rows_for(db.notifications, order["order_id"]))
        assert kinds == ["audit", "confirmation"]
    # the older deploy never received a version-2 step; the newer one ran them all
    assert "order_fulfillment.v2." not in old_log
    assert "order_fulfillment.v2.record_audit" in new_log
    assert db.stock(sku) == 20 - 8


def _cli(deployment: Deployment, versions: str, *args: str) -> Any:
    env = {**os.environ, **deployment.env, "SAGA_VERSIONS": versions, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "celery_sagas.cli", "--app", APP, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_an_operator_moves_waiting_sagas_to_the_new_version_and_finds_the_unknown_ones(
    deployment: Deployment, fresh_sku: Callable[[int], str]
) -> None:
    from tests.integration.versioned_app import ORDER_V2, make_app

    _, old_runtime = make_app("1")
    order = make_order(fresh_sku(5))
    started = old_runtime.coordinator.start("order_fulfillment", order)  # sent, not begun
    saga_id = started.saga_id
    migrate = ("migrate-sagas", "order_fulfillment", "--from", "0", "--to", "2")

    dry = _cli(deployment, "1,2", *migrate, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert saga_id in [m["saga_id"] for m in planned["moved"]] and planned["dry_run"]
    assert SqlSagaStore(db.database_url()).load(saga_id).definition != ORDER_V2.fingerprint

    done = _cli(deployment, "1,2", *migrate)
    assert done.returncode == 0, done.stderr
    assert f"moved {saga_id}" in done.stdout
    record = SqlSagaStore(db.database_url()).load(saga_id)
    assert record.definition == ORDER_V2.fingerprint and len(record.steps) == 5
    log = SqlSagaStore(db.database_url()).transitions(saga_id)
    assert any("moved to order_fulfillment.v2" in (t.reason or "") for t in log)
    assert any("@" in t.actor for t in log if "moved" in (t.reason or ""))  # who did it

    # a worker of the older deploy does not have version 2: the saga is reported there
    unknown = _cli(deployment, "1", "list", "--unknown-definition", "--json")
    assert unknown.returncode == 0, unknown.stderr
    assert saga_id in [s["saga_id"] for s in json.loads(unknown.stdout)]
    old_installed = frozenset(old_runtime.sagas.versions)
    stats = StatsReader(db.database_url(), settle_after=None, installed=old_installed)()
    assert stats.unknown_definition.get("order_fulfillment", 0) >= 1  # the metric's source
    known = _cli(deployment, "1,2", "list", "--unknown-definition", "--json")
    assert saga_id not in [s["saga_id"] for s in json.loads(known.stdout)]
    bad = _cli(deployment, "1,2", "migrate-sagas", "order_fulfillment", "--from", "0", "--to", "7")
    assert bad.returncode == 1 and bad.stderr.startswith("Error: [not_found]")
