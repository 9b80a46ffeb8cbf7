"""Turns an outbox message into the chain ``step_task.si(...) | reply.s(...)`` and sends it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Celery, chain

from celery_sagas.definition import Saga
from celery_sagas.protocols import OutboxMessage

ADVANCE_TASK = "celery_sagas.advance"
COMPENSATED_TASK = "celery_sagas.compensated"


def step_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    """The step task's kwargs: ``saga_id`` first, so Flower finds it (``kwargs:saga_id=…``)."""
    kwargs = {
        "saga_id": body["saga_id"],
        "step": body["step"],
        "token": body["token"],
        "key": body["key"],
        "payload": body["payload"],
    }
    if body["kind"] == "action":
        kwargs["results"] = body.get("results", {})
    else:
        kwargs["result"] = body.get("result")
    return kwargs


class CeleryDispatcher:
    def __init__(self, app: Celery, sagas: Mapping[str, Saga]) -> None:
        self.app = app
        self.sagas = sagas

    def send(self, message: OutboxMessage) -> None:
        body = message.body
        saga = self.sagas[body["saga"]]
        index = body["step"]
        if body["kind"] == "action":
            task_name, reply_name = saga.step_task_name(index), ADVANCE_TASK
        else:
            task_name, reply_name = saga.compensation_task_name(index), COMPENSATED_TASK
        step = self.app.signature(task_name, kwargs=step_kwargs(body), immutable=True)
        reply = self.app.signature(
            reply_name,
            kwargs={"saga_id": body["saga_id"], "step": index, "token": body["token"]},
        )
        chain(step, reply).apply_async()
