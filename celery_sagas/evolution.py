"""Moving running sagas onto another version of their definition
(``celery-sagas migrate-sagas --from 1 --to 2 --map old_step=new_step [--dry-run]``).

A saga moves only at a step boundary: running forward, its current step sent but not
begun by any worker. Its completed steps are carried over by name (``mapping`` renames
them), in the same order; the current step keeps its name (so a run of it that races the
move shares the new run's idempotency key) and is sent again under the new definition
with a new token. Every move is one transaction, audited in the saga's log with who did it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from celery_sagas import machine
from celery_sagas.coordinator import Coordinator
from celery_sagas.definition import Saga, idempotency_key
from celery_sagas.errors import ConcurrentUpdateError, SagaError
from celery_sagas.machine import FORWARD_STATES, Role, StepStatus
from celery_sagas.protocols import OutboxMessage, SagaRecord, StepRecord


@dataclass(frozen=True)
class Move:
    saga_id: str
    business_key: str
    step: str  # the step it is sent again at


@dataclass(frozen=True)
class Skip:
    saga_id: str
    business_key: str
    reason: str


@dataclass
class MigrationReport:
    moved: list[Move] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    messages: tuple[OutboxMessage, ...] = ()


def rebased_steps(
    record: SagaRecord, target: Saga, mapping: Mapping[str, str]
) -> tuple[tuple[StepRecord, ...], int] | str:
    """Pure: the saga's step rows under ``target`` and its new current index, or why it
    cannot move."""
    if record.state not in FORWARD_STATES or not record.admitted:
        return f"saga is {record.state}" + ("" if record.admitted else " (not admitted)")
    current = record.steps[record.current_step]
    if current.status != StepStatus.RUNNING:
        return f"its current step {current.name} is {current.status}"
    if mapping.get(current.name, current.name) != current.name:
        return f"its current step {current.name} cannot be renamed while it is current"
    names = target.step_names
    if current.name not in names:
        return f"its current step {current.name} is not in the new definition"
    index = names.index(current.name)
    done = {mapping.get(s.name, s.name): s for s in record.steps[: record.current_step]}
    if list(done) != list(names[:index]):
        return (
            f"its completed steps {list(done)} are not the new definition's steps before "
            f"{current.name}: {list(names[:index])}"
        )
    rows = tuple(
        replace(done[name], index=i, name=name)
        if i < index
        else StepRecord(i, name, StepStatus.PENDING)
        for i, name in enumerate(names)
    )
    return rows, index


def migrate_sagas(
    coordinator: Coordinator,
    source: Saga,
    target: Saga,
    mapping: Mapping[str, str],
    actor: str,
    dry_run: bool = False,
    limit: int = 10_000,
) -> MigrationReport:
    """Move every running saga of ``source`` that is at a step boundary onto ``target``."""
    unknown = set(mapping) - set(source.step_names)
    if unknown:
        raise SagaError(f"--map names steps {sorted(unknown)} that {source.name} does not have")
    report = MigrationReport()
    store = coordinator.store
    for record in store.list_sagas(name=source.name, limit=limit, unfinished=True):
        if record.definition not in (source.fingerprint, None):
            continue
        record = store.load(record.saga_id) or record
        outcome = _move(coordinator, record, target, mapping, actor, dry_run)
        if isinstance(outcome, Skip):
            report.skipped.append(outcome)
        else:
            move, written = outcome
            report.moved.append(move)
            report.messages += written
    return report


def _move(
    coordinator: Coordinator,
    record: SagaRecord,
    target: Saga,
    mapping: Mapping[str, str],
    actor: str,
    dry_run: bool,
) -> Skip | tuple[Move, tuple[OutboxMessage, ...]]:
    rebased = rebased_steps(record, target, mapping)
    if isinstance(rebased, str):
        return Skip(record.saga_id, record.business_key, rebased)
    rows, index = rebased
    key = idempotency_key(record.saga_id, record.steps[record.current_step].name, Role.ACTION)
    if coordinator.store.get_guard(key) is not None:
        return Skip(record.saga_id, record.business_key, "a worker has begun its current step")
    move = Move(record.saga_id, record.business_key, target.steps[index].name)
    if dry_run:
        return move, ()
    moved = replace(record, definition=target.fingerprint, steps=rows, current_step=index)
    reason = f"moved to {target.task_prefix} ({target.fingerprint}) by {actor}"
    view = replace(moved.view(coordinator.timing.timeouts(target)), **coordinator.timing.watch())
    decision = machine.decide(view, machine.Migrated(actor, reason), coordinator.clock())
    messages = coordinator.messages_for(moved, decision)
    try:
        written = coordinator.store.migrate(moved, decision, messages, coordinator.clock())
    except ConcurrentUpdateError:
        return Skip(record.saga_id, record.business_key, "it changed while being moved")
    return move, written
