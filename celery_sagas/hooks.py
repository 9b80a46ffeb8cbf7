"""Outcome hooks: ``Saga(on_completed=…, on_failed=…)``.

``hook_messages`` is a pure decision: given a saga, its record before a decision and the
decision, it returns the outbox message of the hook the decision fires (none, or one).
The coordinator writes it in the same transaction as the transition, so a saga fires each
hook once — the transition itself happens once (compare-and-set on the saga's version) —
and it is published after commit, or by the relay if that publish fails.

The hook task is called with ``saga_id``, ``business_key`` and ``outcome``
(``SagaOutcome.as_dict()``); a signature's own args, kwargs and options (``queue``…) are
kept. It runs inside the library's ``celery_sagas.hook`` task, sent to the hook task's
queue, which claims the key ``<saga_id>:<hook>:hook`` first: a duplicate delivery finds it
claimed or done and does nothing; a delivery after a worker died mid-hook takes the claim
over once its lease ran out. The outbox row keeps that key, so the relay re-sends a hook
message lost by the broker until some delivery has claimed it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery_sagas.definition import HOOK_NAMES, Saga, hook_key, hook_task_name
from celery_sagas.machine import Decision, SagaState
from celery_sagas.outcomes import outcome_after
from celery_sagas.protocols import OutboxMessage, SagaRecord

HOOK_KIND = "hook"
HOOKS = dict(zip((SagaState.COMPLETED, SagaState.FAILED), HOOK_NAMES, strict=True))
# signature options that make sense on a hook message (JSON values only)
KEPT_OPTIONS = ("queue", "routing_key", "exchange", "priority", "expires", "countdown")


def fired_hook(record: SagaRecord, decision: Decision) -> str | None:
    """``on_completed`` / ``on_failed`` if ``decision`` moves the saga into COMPLETED /
    FAILED (from any other state, COMPENSATION_FAILED included), else None."""
    if not decision.accepted or decision.state is None or decision.state == record.state:
        return None
    return HOOKS.get(decision.state)


def _signature_parts(target: Any) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """(args, kwargs, options) a signature carries; empty for a task or a name."""
    if not isinstance(target, Mapping):
        return [], {}, {}
    options = dict(target.get("options") or {})
    kept = {k: options[k] for k in KEPT_OPTIONS if options.get(k) is not None}
    return list(target.get("args") or ()), dict(target.get("kwargs") or {}), kept


def hook_messages(saga: Saga, record: SagaRecord, decision: Decision) -> list[OutboxMessage]:
    hook = fired_hook(record, decision)
    target = getattr(saga, hook) if hook else None
    task = hook_task_name(target)
    if hook is None or task is None:
        return []
    args, kwargs, options = _signature_parts(target)
    outcome = outcome_after(record, decision)
    kwargs.update(
        saga_id=record.saga_id, business_key=record.business_key, outcome=outcome.as_dict()
    )
    body = {
        "kind": HOOK_KIND,
        "hook": hook,
        "saga": saga.name,
        "saga_id": record.saga_id,
        "task": task,
        "task_id": f"{record.saga_id}.{hook}",
        "key": hook_key(record.saga_id, hook),
        "args": args,
        "kwargs": kwargs,
        "options": options,
    }
    return [OutboxMessage(saga_id=record.saga_id, body=body)]
