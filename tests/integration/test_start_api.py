"""The start API on SQLite and kombu's in-memory broker (no servers): what ``delay``
returns and refuses, ``connection=`` on SQLite, and ``sagas.get``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from celery_sagas import PayloadConflictError, Saga, SagaError, Step, StepContext, install
from celery_sagas.errors import AmbiguousSagaError, SagaNotFoundError, StoreUnavailableError
from celery_sagas.handle import SagaHandle
from celery_sagas.integration import SagaRuntime
from celery_sagas.store import upgrade
from celery_sagas.store.tables import outbox, sagas


def act(context: StepContext) -> dict[str, Any]:
    return {"step": context.step}


def saga(name: str) -> Saga:
    return Saga(
        name,
        business_key="order_id",
        steps=[Step("charge", action=act, compensation=act, compensation_name="refund")],
    )


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SagaRuntime:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'start.db'}"
    upgrade(url)
    return install(Celery("start-api", broker="memory://"), [saga("shop"), saga("refund")],
                   database_url=url)  # fmt: skip


def saga_count(runtime: SagaRuntime) -> int:
    with runtime.store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(sagas)).scalar_one())


def test_delay_returns_a_handle_on_the_saga_it_committed(runtime: SagaRuntime) -> None:
    start = runtime.start_task("shop")
    handle = start.delay({"order_id": "A-1"})
    assert isinstance(handle, SagaHandle) and handle.created
    assert handle.id == handle.saga_id == runtime.store.find("A-1").saga_id
    assert handle.state().value == "STARTED"
    again = start.delay(payload={"order_id": "A-1"})
    assert (again.saga_id, again.created) == (handle.saga_id, False)
    assert start.apply_async(({"order_id": "A-1"},), task_id="ignored").saga_id == handle.saga_id
    assert saga_count(runtime) == 1


def test_a_chosen_task_id_becomes_the_saga_id(runtime: SagaRuntime) -> None:
    handle = runtime.start_task("shop").apply_async(({"order_id": "A-2"},), task_id="my-id")
    assert handle.saga_id == "my-id" and runtime.store.load("my-id") is not None


def test_what_delay_refuses_writes_nothing(runtime: SagaRuntime) -> None:
    start = runtime.start_task("shop")
    start.delay({"order_id": "A-1", "total": 1})
    with pytest.raises(PayloadConflictError):
        start.delay({"order_id": "A-1", "total": 2})
    with pytest.raises(TypeError, match="one payload"):
        start.delay({"order_id": "A-3"}, {"order_id": "A-4"})
    with pytest.raises(SagaError, match="countdown is not supported"):
        start.apply_async(({"order_id": "A-5"},), countdown=10)
    with pytest.raises(SagaError, match="needs the durable start"):
        start.delay({"order_id": "A-6"}, durable=False, connection=object())
    with pytest.raises(SagaError, match="Connection or Session"):
        start.delay({"order_id": "A-7"}, connection=object())
    assert saga_count(runtime) == 1


def test_enqueue_only_publishes_a_start_task(runtime: SagaRuntime) -> None:
    result = runtime.start_task("shop").enqueue({"order_id": "B-1"})
    assert not isinstance(result, SagaHandle) and result.id
    assert saga_count(runtime) == 0  # a worker will write it


def test_a_start_in_a_sqlite_transaction_commits_or_rolls_back_with_it(
    runtime: SagaRuntime,
) -> None:
    start = runtime.start_task("shop")
    with pytest.raises(ZeroDivisionError), runtime.store.engine.begin() as conn:
        rolled_back = start.delay({"order_id": "C-1"}, connection=conn)
        1 / 0  # noqa: B018
    assert saga_count(runtime) == 0
    assert rolled_back.publish() == 0
    with runtime.store.engine.begin() as conn:
        committed = start.delay({"order_id": "C-1"}, connection=conn)
    assert committed.state().value == "STARTED"
    with runtime.store.engine.connect() as conn:
        rows = conn.execute(sa.select(outbox.c.saga_id)).scalars().all()
    assert rows == [committed.saga_id]


def test_get_by_id_or_key_and_an_ambiguous_key_lists_the_saga_types(runtime: SagaRuntime) -> None:
    shop = runtime.start_task("shop").delay({"order_id": "D-1"})
    assert runtime.get(shop.saga_id).saga_id == shop.saga_id
    assert runtime.get("D-1").saga_id == shop.saga_id
    refund = runtime.start_task("refund").delay({"order_id": "D-1"})
    with pytest.raises(AmbiguousSagaError, match=r"refund .* shop"):
        runtime.get("D-1")
    assert runtime.get("D-1", name="refund").saga_id == refund.saga_id
    with pytest.raises(SagaNotFoundError):
        runtime.get("nothing")


def test_delay_with_the_database_down_raises_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    app = Celery("db-down", broker="memory://")
    published: list[Any] = []
    app.amqp.send_task_message = lambda *a, **kw: published.append(a)  # type: ignore[method-assign]
    nowhere = "postgresql+psycopg2://postgres@127.0.0.1:1/sagas"  # nothing listens on port 1
    runtime = install(app, [saga("shop")], database_url=nowhere)
    with pytest.raises(StoreUnavailableError, match="cannot reach the saga database"):
        runtime.start_task("shop").delay({"order_id": "E-1"})
    assert published == []
