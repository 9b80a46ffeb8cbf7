"""Turns an outbox message into the chain ``step_task.si(...) | reply.s(...)`` and sends it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from celery import Celery, chain

from celery_sagas.definition import Saga
from celery_sagas.hooks import HOOK_KIND
from celery_sagas.machine import Role
from celery_sagas.protocols import OutboxMessage
from celery_sagas.redaction import redact

ADVANCE_TASK = "celery_sagas.advance"
COMPENSATED_TASK = "celery_sagas.compensated"
DEAD_LETTER_TASK = "celery_sagas.dead_letter"
# (kwargs, task name, saga, step index) -> the kwargs stamped and signed
Signer = Callable[[dict[str, Any], str, Saga, int], dict[str, Any]]
# (saga, role, step index) -> the time limit a step message carries (None: the task's own)
Budget = Callable[[Saga, Role, int], float | None]
HOOK_TASK = "celery_sagas.hook"


def step_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    """The step task's kwargs: ``saga_id`` first, so Flower finds it (``kwargs:saga_id=…``)."""
    kwargs = {
        "saga_id": body["saga_id"],
        "step": body["step"],
        "token": body["token"],
        "key": body["key"],
    }
    # the data travels only where the participant cannot read the saga (coordinator_hop)
    kwargs.update({k: body[k] for k in ("payload", "results", "result") if k in body})
    if body["kind"] == Role.COMPENSATION:
        kwargs["attempts_before"] = body.get("attempts_before", 0)
    return kwargs


def kwargs_repr(kwargs: Mapping[str, Any], redact_fields: Sequence[str]) -> str:
    """What Flower and the worker log show: a dict literal (Flower's ``kwargs:saga_id=…``
    search parses it) with the payload's secrets masked."""
    shown = {
        key: redact(value, redact_fields)
        if key in ("payload", "results", "result", "outcome")
        else value
        for key, value in kwargs.items()
    }
    if isinstance(shown.get("applying"), Mapping):  # a carried outcome: its kind only
        carried = shown["applying"]
        shown["applying"] = {
            "outcome": (carried.get("outcome") or {}).get("outcome"),
            "tries": carried.get("tries"),
        }
    return repr(shown)


class CeleryDispatcher:
    def __init__(
        self,
        app: Celery,
        sagas: Mapping[str, Saga],
        redact_fields: Sequence[str] = (),
        coordinator_hop: bool = False,
        sign: Signer | None = None,
        publish_options: Mapping[str, Any] | None = None,
        budget: Budget | None = None,
    ) -> None:
        """``sign``: stamps and signs a step command (``coordinator_hop``).
        ``publish_options``: added to every publish (the caller's start bounds its
        retries with them, so a broker outage cannot hold the caller). ``budget``: a step
        message's time limit, both hard and soft (``inline_steps``: ``inline.budget``)."""
        self.app = app
        self.sagas = sagas
        self.redact_fields = tuple(redact_fields)
        self.coordinator_hop = coordinator_hop
        self.sign = sign
        self.publish_options = dict(publish_options or {})
        self.budget = budget

    def _definition(self, body: Mapping[str, Any]) -> Saga:
        """The definition the message's saga started with (its fingerprint), installed here
        next to the newest; a message from before fingerprints: the newest by name."""
        fingerprint = body.get("definition")
        versions = getattr(self.sagas, "versions", {})
        return versions.get(fingerprint) or self.sagas[body["saga"]]

    def step_task_name(self, body: Mapping[str, Any]) -> str:
        """The task a step or compensation message goes to."""
        saga, index = self._definition(body), body["step"]
        if body["kind"] == Role.ACTION:
            return saga.step_task_name(index)
        return saga.compensation_task_name(index)

    def send(self, message: OutboxMessage) -> None:
        body = message.body
        if body["kind"] == HOOK_KIND:
            self._send_hook(body)
            return
        if body["kind"] == "dead_letter":
            # ids only: the database row is the source of truth
            self.app.signature(
                DEAD_LETTER_TASK, kwargs={"saga_id": body["saga_id"], "step": body["step"]}
            ).apply_async()
            return
        saga = self._definition(body)
        index = body["step"]
        task_name = self.step_task_name(body)
        reply_name = ADVANCE_TASK if body["kind"] == Role.ACTION else COMPENSATED_TASK
        kwargs = step_kwargs(body)
        shown = kwargs_repr(kwargs, self.redact_fields)
        # every task of a saga hangs under one root (the start task, whose id is the saga id)
        # even when the relay, the scanner or an operator command sends it
        if not self.coordinator_hop:
            # the step task applies its own outcome: one message, sent by name (routes and
            # task options apply; no signature to build), or run in process in eager mode
            options = {
                "kwargs": kwargs,
                "kwargsrepr": shown,
                "root_id": body["saga_id"],
                **self.publish_options,
            }
            limit = self.budget(saga, body["kind"], index) if self.budget else None
            if limit is not None:  # the whole inline run it may begin (integration.alarm)
                options.update(time_limit=limit, soft_time_limit=limit)
            if self.app.conf.task_always_eager:
                self.app.tasks[task_name].apply_async(**options)
            else:
                self.app.send_task(task_name, ignore_result=True, **options)
            return
        if self.sign is not None:
            kwargs = self.sign(kwargs, task_name, saga, index)
        step = self.app.signature(task_name, kwargs=kwargs, immutable=True, kwargsrepr=shown)
        reply = self.app.signature(
            reply_name,
            kwargs={"saga_id": body["saga_id"], "step": index, "token": body["token"]},
        )
        chain(step, reply).apply_async(root_id=body["saga_id"], **self.publish_options)

    def _send_hook(self, body: Mapping[str, Any]) -> None:
        """An outcome hook (``celery_sagas.hooks``): the run-once wrapper task, on the
        queue the hook task is routed to (or its signature names)."""
        kwargs = {
            "saga_id": body["saga_id"],
            "task": body["task"],
            "key": body["key"],
            "args": body["args"],
            "kwargs": body["kwargs"],
        }
        options = {**body["options"], **self.publish_options}
        options.setdefault("queue", self.app.amqp.router.route({}, body["task"])["queue"].name)
        options.update(
            kwargs=kwargs,
            task_id=body["task_id"],
            root_id=body["saga_id"],
            kwargsrepr=kwargs_repr({**kwargs, "kwargs": "..."}, self.redact_fields),
        )
        if self.app.conf.task_always_eager:
            self.app.tasks[HOOK_TASK].apply_async(**options)
        else:
            self.app.send_task(HOOK_TASK, **options)
