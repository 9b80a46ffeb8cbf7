"""Moving running sagas onto a new version of their definition (``migrate_sagas``), on
the in-memory store, SQLite and PostgreSQL: only at a step boundary, audited, and the
saga then finishes on the new version."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from celery_sagas import Saga, Step, outbox
from celery_sagas.coordinator import Coordinator
from celery_sagas.definition import StepContext, registry
from celery_sagas.evolution import migrate_sagas, rebased_steps
from celery_sagas.machine import SagaState, StepStatus, StepSucceeded
from celery_sagas.protocols import SagaStore
from celery_sagas.store import SqlSagaStore, upgrade
from celery_sagas.testing import InMemorySagaStore, RecordingDispatcher, run_until_settled
from tests.conftest import require_service
from tests.support.databases import create_pg_database, drop_pg_database

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def act(name: str) -> Any:
    def run(ctx: StepContext) -> dict[str, str]:
        return {"did": name}

    return run


def step(name: str) -> Step:
    return Step(name, act(name), act(f"undo {name}"), compensation_name=f"undo_{name}")


V1 = Saga("order", [step("reserve"), step("charge"), step("ship")], version=1)
V2 = Saga("order", [step("hold"), step("charge"), step("audit"), step("ship")], version=2)


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[SagaStore]:
    if request.param == "memory":
        yield InMemorySagaStore()
        return
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'evolution.db'}"
        upgrade(url)
        yield SqlSagaStore(url)
        return
    require_service("postgresql")
    url = create_pg_database("sagas_evolution")
    upgrade(url)
    yield SqlSagaStore(url)
    drop_pg_database(url)


def test_waiting_sagas_move_at_a_step_boundary_and_finish_on_the_new_version(
    store: SagaStore,
) -> None:
    old = Coordinator(store, registry([V1]), clock=lambda: NOW)
    both = Coordinator(store, registry([V1, V2]), clock=lambda: NOW)
    dispatcher = RecordingDispatcher()
    at_charge = old.start("order", {"id": "a"}).saga_id  # will wait at step 1 (charge)
    begun = old.start("order", {"id": "b"}).saga_id  # a worker will have begun step 1
    for saga_id in (at_charge, begun):
        record = store.load(saga_id)
        assert record is not None and record.definition == V1.fingerprint
    first = store.load(at_charge)
    assert first is not None
    old.handle(at_charge, StepSucceeded(0, first.token, {"did": "reserve"}))
    second = store.load(begun)
    assert second is not None
    old.handle(begun, StepSucceeded(0, second.token, {"did": "reserve"}))
    store.begin_guard(f"{begun}:charge:action", NOW)  # a worker took its charge step

    mapping = {"reserve": "hold"}
    dry = migrate_sagas(both, V1, V2, mapping, actor="ops@host", dry_run=True)
    assert [m.saga_id for m in dry.moved] == [at_charge]
    assert [(s.saga_id, s.reason) for s in dry.skipped] == [
        (begun, "a worker has begun its current step")
    ]
    record = store.load(at_charge)
    assert record is not None and record.definition == V1.fingerprint  # dry run: unchanged

    report = migrate_sagas(both, V1, V2, mapping, actor="ops@host")
    assert [(m.saga_id, m.step) for m in report.moved] == [(at_charge, "charge")]
    moved = store.load(at_charge)
    assert moved is not None and moved.definition == V2.fingerprint
    assert [s.name for s in moved.steps] == ["hold", "charge", "audit", "ship"]
    assert moved.steps[0].status == StepStatus.COMPLETED
    assert moved.steps[0].result == {"did": "reserve"}  # carried over under its new name
    assert [m.body["step_name"] for m in report.messages] == ["charge"]
    assert report.messages[0].body["definition"] == V2.fingerprint
    log = store.transitions(at_charge)
    assert any(t.actor == "ops@host" and "moved to order.v2" in (t.reason or "") for t in log)

    outbox.publish(store, dispatcher, report.messages, both.clock)
    final = run_until_settled(both, store, dispatcher, at_charge)
    assert final.state == SagaState.COMPLETED
    assert [s.result for s in final.steps][1:] == [{"did": n} for n in ("charge", "audit", "ship")]


def test_a_saga_whose_steps_do_not_line_up_is_left_where_it_is() -> None:
    store = InMemorySagaStore()
    old = Coordinator(store, registry([V1]), clock=lambda: NOW)
    saga_id = old.start("order", {"id": "c"}).saga_id
    record = store.load(saga_id)
    assert record is not None
    # without the rename, version 2 has "hold" before "charge": reserve has no place
    old.handle(saga_id, StepSucceeded(0, record.token, {}))
    record = store.load(saga_id)
    assert record is not None
    why = rebased_steps(record, V2, {})
    assert isinstance(why, str) and "completed steps ['reserve']" in why
    assert isinstance(rebased_steps(record, V2, {"charge": "pay"}), str)  # current: no rename


def test_the_saga_page_says_when_a_sagas_definition_is_not_installed() -> None:
    from celery_sagas.integration.saga_view import read_detail

    store = InMemorySagaStore()
    saga_id = Coordinator(store, registry([V1]), clock=lambda: NOW).start("order", {"id": "p"})
    detail = read_detail(store, saga_id.saga_id, (), registry([V2]))  # type: ignore[arg-type]
    assert detail is not None and not detail.definition_installed
    known = read_detail(store, saga_id.saga_id, (), registry([V1, V2]))  # type: ignore[arg-type]
    assert known is not None and known.definition_installed
