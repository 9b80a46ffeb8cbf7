"""Outcome hooks go to the queue their task is routed to (or their signature names), on a
real Redis broker, and an eager app runs them in process, once."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import select

from celery_sagas import Saga, Step, StepContext, install
from celery_sagas.hooks import hook_messages
from celery_sagas.machine import Decision, SagaState
from celery_sagas.store import upgrade
from celery_sagas.store.tables import outbox
from tests.integration.test_routing import queued


def act(context: StepContext) -> dict[str, Any]:
    return {"step": context.step}


def shop(**hooks: Any) -> Saga:
    return Saga(
        "shop",
        steps=[Step("charge", action=act, compensation=act, compensation_name="refund")],
        **hooks,
    )


def completed_message(saga: Saga) -> Any:
    from tests.unit.test_hooks import record

    decision = Decision(accepted=True, state=SagaState.COMPLETED, current_step=0, token=1)
    (message,) = hook_messages(saga, record(SagaState.PENDING), decision)
    return message


def test_a_hook_is_published_on_its_tasks_route_or_its_signatures_queue(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    app = Celery("hooks", broker=redis_url)
    app.conf.task_routes = {"shop.done": {"queue": "shop.hooks"}}
    signature = app.signature("shop.failed", options={"queue": "ops"})
    routed, signed = shop(on_completed="shop.done"), shop(on_completed=signature)
    runtime = install(app, [routed], database_url=f"sqlite:///{tmp_path / 'hooks.db'}")
    runtime.dispatcher.send(completed_message(routed))
    runtime.dispatcher.send(completed_message(signed))
    client = redis.Redis.from_url(redis_url)

    (by_route,) = queued(client, "shop.hooks")
    (by_signature,) = queued(client, "ops")
    assert queued(client, "celery") == []
    for message, task in ((by_route, "shop.done"), (by_signature, "shop.failed")):
        assert message["headers"]["task"] == "celery_sagas.hook"
        assert message["headers"]["id"] == "s-1.on_completed"
        assert message["headers"]["root_id"] == "s-1"
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert kwargs["task"] == task and kwargs["key"] == "s-1:on_completed:hook"
        assert kwargs["kwargs"]["outcome"]["state"] == "COMPLETED"
        assert "outcome" not in message["headers"]["kwargsrepr"]  # step results stay out


def test_an_eager_app_runs_a_sagas_hook_once_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    app = Celery("eager-hooks", broker="memory://")
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    calls: list[tuple[str, str, str]] = []

    @app.task(name="shop.done")
    def done(saga_id: str, business_key: str, outcome: dict[str, Any]) -> None:
        calls.append((saga_id, business_key, outcome["state"]))

    url = f"sqlite:///{tmp_path / 'eager.db'}"
    upgrade(url)
    runtime = install(app, [shop(on_completed="shop.done", business_key="id")], database_url=url)
    handle = runtime.start_task("shop").delay({"id": "o-1"})
    assert handle.state() == SagaState.COMPLETED
    assert calls == [(handle.saga_id, "o-1", "COMPLETED")]
    # its outbox row is marked sent, so the relay never sends it again
    hook_key = f"{handle.saga_id}:on_completed:hook"
    with runtime.store.engine.connect() as conn:
        sent = conn.execute(select(outbox.c.sent_at).where(outbox.c.key == hook_key)).all()
    assert len(sent) == 1 and sent[0].sent_at is not None
