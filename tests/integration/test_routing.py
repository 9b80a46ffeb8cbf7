"""A step declared with ``queue=`` is published to that queue, on a real Redis broker, both
when a step task applies its own outcome (one message) and with ``coordinator_hop`` (a
chain whose first task is the step)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_sagas import Saga, Step, StepContext, install
from celery_sagas.protocols import OutboxMessage
from celery_sagas.store import upgrade


def act(context: StepContext) -> dict[str, Any]:
    return {"step": context.step}


ROUTED = Saga(
    "routed",
    steps=[
        Step(
            "reserve",
            action=act,
            compensation=act,
            compensation_name="release",
            queue="routed.inventory",
        ),
        Step("charge", action=act, compensation=act, compensation_name="refund"),
    ],
)


def step_message(index: int, kind: str = "action") -> OutboxMessage:
    name = ROUTED.steps[index].name
    return OutboxMessage(
        "saga-1",
        {
            "kind": kind,
            "saga": "routed",
            "saga_id": "saga-1",
            "step": index,
            "step_name": name,
            "token": 3,
            "payload": {"id": "order-1"},
            "key": f"saga-1:{name}:{kind}",
            "results": {},
        },
    )


def queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The messages waiting in ``queue`` (kombu's Redis transport: one list per queue)."""
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


@pytest.mark.parametrize("coordinator_hop", [False, True], ids=["inline", "coordinator_hop"])
def test_a_step_with_a_queue_is_published_there_with_the_saga_as_root(
    redis_url: str, tmp_path: Path, coordinator_hop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)  # it would win over broker=
    app = Celery("routing", broker=redis_url)
    runtime = install(
        app,
        [ROUTED],
        database_url=f"sqlite:///{tmp_path / 'routing.db'}",
        coordinator_hop=coordinator_hop,
        signing_key="routing-key",
    )
    runtime.dispatcher.send(step_message(0))
    runtime.dispatcher.send(step_message(1))
    runtime.dispatcher.send(step_message(0, kind="compensation"))
    client = redis.Redis.from_url(redis_url)

    # the step and its compensation go to the step's queue (its participant's workers)
    inventory = queued(client, "routed.inventory")
    assert sorted(m["headers"]["task"] for m in inventory) == ["routed.release", "routed.reserve"]
    default = queued(client, "celery")
    assert [m["headers"]["task"] for m in default] == ["routed.charge"]
    for message in inventory + default:
        assert message["headers"]["root_id"] == "saga-1"  # one root: the saga (start task)
        assert "'saga_id': 'saga-1'" in message["headers"]["kwargsrepr"]
    reserve = next(m for m in inventory if m["headers"]["task"] == "routed.reserve")
    body = json.loads(base64.b64decode(reserve["body"]))
    _args, kwargs, embed = body
    assert kwargs["token"] == 3 and kwargs["key"] == "saga-1:reserve:action"
    # the coordinator task follows the step only with coordinator_hop
    followers = [task["task"] for task in embed.get("chain") or []]
    assert followers == (["celery_sagas.advance"] if coordinator_hop else [])


@pytest.mark.parametrize("coordinator_hop", [False, True], ids=["inline", "coordinator_hop"])
def test_an_eager_app_runs_a_saga_to_the_end_in_process(
    tmp_path: Path, coordinator_hop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Users who test with ``task_always_eager`` see the whole saga run in their process
    (every step is published through its task, which honours eager mode)."""
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    app = Celery("eager", broker="memory://")
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    url = f"sqlite:///{tmp_path / 'eager.db'}"
    upgrade(url)
    runtime = install(
        app, [ROUTED], database_url=url, coordinator_hop=coordinator_hop, signing_key="k"
    )
    runtime.start_task("routed").delay({"id": "order-7"})
    record = runtime.store.find("order-7")
    assert record is not None and record.state.value == "COMPLETED"
    assert [s.result for s in record.steps] == [{"step": "reserve"}, {"step": "charge"}]
