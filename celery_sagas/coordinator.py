"""The coordinator: load → decide → save state + log + outbox in ONE transaction.

It returns the outbox messages it wrote; publishing them after commit is the caller's
job (``outbox.publish``). A lost compare-and-set is retried with a fresh load.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from celery_sagas import hooks, machine
from celery_sagas.definition import Saga, SagaRegistry, idempotency_key, registry
from celery_sagas.errors import (
    ConcurrentUpdateError,
    SagaError,
    UnknownDefinitionError,
)
from celery_sagas.log import log_transition, logger
from celery_sagas.machine import (
    SETTLED_STATES,
    Command,
    Decision,
    Role,
    RunStep,
    SagaView,
    SendToDeadLetterQueue,
    StepStatus,
)
from celery_sagas.payloads import PayloadLimits, check_payload
from celery_sagas.protocols import (
    Claim,
    CreateResult,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    SagaRecord,
    SagaStore,
)
from celery_sagas.redaction import redact
from celery_sagas.settings import DEFAULT_REDACT_FIELDS

__all__ = ["Coordinator", "Outcome", "PayloadLimits", "Timing", "check_payload", "utcnow"]

MAX_CAS_ATTEMPTS = 20


def utcnow() -> datetime:
    return datetime.now(UTC)


def payload_hash(payload: Mapping[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Outcome:
    """What one event did: the decision (or None if the saga is unknown) and the outbox
    messages to publish."""

    saga_id: str
    decision: Decision | None
    messages: tuple[OutboxMessage, ...] = ()
    created: bool = False


def build_message(
    saga: Saga,
    record: SagaRecord | None,
    saga_id: str,
    payload: Mapping[str, Any],
    decision: Decision,
    command: Command,
    with_data: bool = False,
) -> OutboxMessage:
    """The outbox body for one command: ids only (the step reads the payload and earlier
    results from the saga it checks), or, ``with_data``, everything a participant worker
    without the saga database needs (``coordinator_hop``). For a dead letter: its ids."""
    step = saga.steps[command.step]
    if isinstance(command, SendToDeadLetterQueue):
        return OutboxMessage(
            saga_id=saga_id,
            body={
                "kind": "dead_letter",
                "saga": saga.name,
                "saga_id": saga_id,
                "step": command.step,
                "step_name": step.name,
            },
        )
    role = Role.ACTION if isinstance(command, RunStep) else Role.COMPENSATION
    body: dict[str, Any] = {
        "kind": role.value,
        "saga": saga.name,
        "saga_id": saga_id,
        "step": command.step,
        "step_name": step.name,
        "token": command.token,
        "key": idempotency_key(saga_id, step.name, role),
        "definition": saga.fingerprint,
    }
    if role == Role.COMPENSATION:
        # attempts already made (before an operator retry), so attempt numbers continue
        body["attempts_before"] = record.steps[command.step].compensation_attempts if record else 0
    if with_data:
        body.update(_step_data(saga, record, payload, decision, command, role))
    return OutboxMessage(saga_id=saga_id, body=body)


def _step_data(
    saga: Saga,
    record: SagaRecord | None,
    payload: Mapping[str, Any],
    decision: Decision,
    command: Command,
    role: Role,
) -> dict[str, Any]:
    """The payload and the results a step's participant gets, for a message that must
    carry them."""
    if role == Role.COMPENSATION:
        result = record.steps[command.step].result if record else None
        return {"payload": dict(payload), "result": result}
    results: dict[str, Any] = record.results() if record else {}
    for change in decision.step_changes:
        if change.has_result and change.new == StepStatus.COMPLETED:
            results[saga.steps[change.index].name] = change.result
    kept = {k: v for k, v in results.items() if k in saga.step_names}
    return {"payload": dict(payload), "results": kept}


@dataclass(frozen=True)
class Timing:
    """Timeouts and deadlines, from the definitions with configuration overrides.

    ``step_timeouts`` keys are ``"saga.step"`` or ``"step"``; ``saga_deadlines`` keys are
    saga names; values are seconds."""

    step_timeouts: Mapping[str, float] = field(default_factory=dict)
    saga_deadlines: Mapping[str, float] = field(default_factory=dict)
    max_concurrent: Mapping[str, int] = field(default_factory=dict)
    max_redispatches: int = 2
    time_limit_grace: float = 0.0  # a started step's hard limit: its timeout + this
    queue_timeout: float | None = None  # how long a step may wait for a worker (None: ever)
    untimed_resend: float | None = None  # an untimed step's unbegun message: re-sent after
    heartbeat_lease: float | None = None  # an untimed begun step: silent after no beat for

    def watch(self) -> dict[str, Any]:
        """The saga-wide fields of a ``SagaView`` that tell the scanner when to act."""
        return {
            "max_redispatches": self.max_redispatches,
            "time_limit_grace": self.time_limit_grace,
            "queue_timeout": self.queue_timeout,
            "untimed_resend": self.untimed_resend,
            "heartbeat_lease": self.heartbeat_lease,
        }

    def timeouts(self, saga: Saga) -> tuple[float | None, ...]:
        return tuple(
            self.step_timeouts.get(f"{saga.name}.{step.name}")
            or self.step_timeouts.get(step.name)
            or step.timeout_seconds
            for step in saga.steps
        )

    def deadline(self, saga: Saga) -> float | None:
        return self.saga_deadlines.get(saga.name) or saga.deadline  # type: ignore[return-value]

    def limit(self, saga: Saga) -> int | None:
        return self.max_concurrent.get(saga.name) or saga.max_concurrent


class Coordinator:
    def __init__(
        self,
        store: SagaStore,
        sagas: Mapping[str, Saga],
        clock: Callable[[], datetime] = utcnow,
        timing: Timing | None = None,
        redact_fields: Sequence[str] = DEFAULT_REDACT_FIELDS,
        auto_retry_interval: float = 3600.0,
        messages_with_data: bool = False,
        limits: PayloadLimits | None = None,
    ) -> None:
        """``messages_with_data``: step messages carry the payload and results (for
        participant workers without the saga database, ``coordinator_hop``); otherwise
        they carry ids and the step reads the rest from the saga it checks."""
        self.store = store
        self.limits = limits or PayloadLimits()
        self.sagas = sagas
        self.definitions = (
            sagas if isinstance(sagas, SagaRegistry) else registry(list(sagas.values()))
        )
        self.clock = clock
        self.timing = timing or Timing()
        self.redact_fields = tuple(redact_fields)
        self.auto_retry_interval = auto_retry_interval
        self.with_data = messages_with_data

    def definition(self, name: str) -> Saga:
        try:
            return self.sagas[name]
        except KeyError:
            raise SagaError(f"unknown saga {name!r}; installed: {sorted(self.sagas)}") from None

    def definition_for(self, record: SagaRecord) -> Saga:
        """The definition ``record`` started with, or ``UnknownDefinitionError`` if this
        process does not have it installed (a rolling deploy: another worker has it)."""
        found = self.definitions.for_fingerprint(record.name, record.definition)
        if found is None:
            raise UnknownDefinitionError(
                f"saga {record.saga_id} ({record.name}) started with definition "
                f"{record.definition}, which is not installed here",
                saga_id=record.saga_id,
            )
        return found

    def knows(self, record: SagaRecord) -> bool:
        return self.definitions.for_fingerprint(record.name, record.definition) is not None

    def view(self, record: SagaRecord) -> SagaView:
        saga = self.definition_for(record)
        return replace(record.view(self.timing.timeouts(saga)), **self.timing.watch())

    def complete(self, record: SagaRecord, decision: Decision) -> Decision:
        """Fill in what the pure machine cannot know: the dead letter's task name and
        its (redacted) payload."""
        dead = decision.dead_letter
        if dead is None or dead.status != "dead":
            return decision
        saga = self.definition_for(record)
        return replace(
            decision,
            dead_letter=replace(
                dead,
                task_name=saga.compensation_task_name(dead.step),
                payload=redact(record.payload, self.redact_fields),
                next_auto_retry_at=self.clock() + timedelta(seconds=self.auto_retry_interval),
            ),
        )

    def messages_for(self, record: SagaRecord, decision: Decision) -> list[OutboxMessage]:
        saga = self.definition_for(record)
        return [
            build_message(
                saga, record, record.saga_id, record.payload, decision, command, self.with_data
            )
            for command in decision.commands
        ] + hooks.hook_messages(saga, record, decision)  # on_completed / on_failed

    def start(
        self, name: str, payload: Any, saga_id: str | None = None, within: Any = None
    ) -> Outcome:
        """Persist a new saga and the message for its first step, in one transaction:
        the store's own, or ``within`` (the caller's SQLAlchemy ``Connection`` or
        ``Session``, which then commits or rolls back the saga with its own rows).

        Starting the same business key with the same payload again returns the existing
        saga; another payload raises ``PayloadConflictError``. A saga type at its
        ``max_concurrent`` limit leaves the new saga waiting in STARTED."""
        saga = self.definition(name)
        key = check_payload(saga, payload, self.limits)
        saga_id = saga_id or str(uuid.uuid4())
        now = self.clock()
        deadline = self.timing.deadline(saga)
        deadline_at = now + timedelta(seconds=deadline) if deadline else None
        timeouts = self.timing.timeouts(saga)
        view = SagaView(
            saga_id=saga_id,
            name=saga.name,
            state=None,
            current_step=0,
            token=0,
            steps=tuple(
                machine.StepView(i, s.name, StepStatus.PENDING, timeout=timeouts[i])
                for i, s in enumerate(saga.steps)
            ),
            deadline_at=deadline_at,
            **self.timing.watch(),
        )
        limited = self.timing.limit(saga) is not None
        decision = machine.decide(view, machine.Begin(admit=not limited), now)
        messages = [
            build_message(saga, None, saga_id, payload, decision, command, self.with_data)
            for command in decision.commands
        ]
        new = NewSaga(
            saga_id,
            saga.name,
            key,
            payload,
            payload_hash(payload),
            saga.step_names,
            deadline_at,
            saga.fingerprint,
        )
        created = self._create(new, decision, messages, now, within)
        if not created.created:
            logger.info(
                "saga %s already started for %s %r; not started again",
                created.record.saga_id,
                saga.name,
                key,
                extra={"saga_id": created.record.saga_id, "saga": saga.name},
            )
            return Outcome(created.record.saga_id, decision, (), False)
        self._log(saga_id, saga.name, decision)
        written = created.messages + self.admit(saga.name)
        return Outcome(created.record.saga_id, decision, written, True)

    def _create(
        self,
        new: NewSaga,
        decision: Decision,
        messages: list[OutboxMessage],
        now: datetime,
        within: Any,
    ) -> CreateResult:
        if within is None:
            return self.store.create(new, decision, messages, now)
        create_in = getattr(self.store, "create_in", None)
        if create_in is None:
            raise SagaError(f"{self.store!r} cannot start a saga in the caller's transaction")
        result: CreateResult = create_in(within, new, decision, messages, now)
        return result

    def handle(
        self,
        saga_id: str,
        event: machine.Event,
        guard: GuardRecord | None = None,
        known: SagaRecord | None = None,
    ) -> Outcome:
        """Apply one event: load → decide → commit, the commit gated on the version read
        (a compare-and-set), retrying a lost race with a fresh load. ``guard``: the step
        outcome behind ``event``, recorded in that same transaction (alone if the saga
        does not accept the event); ``known``: a snapshot of the saga to decide on first
        (read when the step began)."""
        now = self.clock()
        for _ in range(MAX_CAS_ATTEMPTS):
            record = known or self.store.load(saga_id)
            known = None  # after a lost race: load
            if record is None:
                self._record_guard_alone(guard, now)
                logger.warning("event for unknown saga %s ignored", saga_id)
                return Outcome(saga_id, None)
            decision = machine.decide(self.view(record), event, now)
            if not decision.accepted:
                self._record_guard_alone(guard, now)
                self._log_ignored(record, event, decision)
                return Outcome(saga_id, decision)
            decision = self.complete(record, decision)
            messages = self.messages_for(record, decision)
            try:
                written = self.store.write(record, decision, messages, now, guard)
            except ConcurrentUpdateError:
                continue
            self._log(saga_id, record.name, decision)
            if decision.state in SETTLED_STATES:
                written += self.admit(record.name)
            return Outcome(saga_id, decision, written)
        raise ConcurrentUpdateError(f"saga {saga_id}: gave up after {MAX_CAS_ATTEMPTS} races")

    def _record_guard_alone(self, guard: GuardRecord | None, now: datetime) -> None:
        if guard is not None:
            self.store.put_guard(guard, now)

    def apply_claimed(
        self, claim: Claim, record: SagaRecord, event: machine.Event, now: datetime
    ) -> tuple[Decision, tuple[OutboxMessage, ...]]:
        """Decide and commit inside a scanner's claim (the saga row is locked)."""
        decision = machine.decide(self.view(record), event, now)
        if not decision.accepted:
            return decision, ()
        decision = self.complete(record, decision)
        written = claim.commit(record, decision, self.messages_for(record, decision), now)
        self._log(record.saga_id, record.name, decision)
        return decision, written

    def admit(self, name: str) -> tuple[OutboxMessage, ...]:
        """Start waiting sagas of ``name`` while its ``max_concurrent`` allows, oldest first."""
        limit = self.timing.limit(self.definition(name))
        if limit is None:
            return ()
        written: tuple[OutboxMessage, ...] = ()
        now = self.clock()
        with self.store.claim_waiting(name, limit) as claim:
            for record in claim.records:
                written += self.apply_claimed(claim, record, machine.Admit(), now)[1]
        return written

    @staticmethod
    def _log(saga_id: str, name: str, decision: Decision) -> None:
        for t in decision.transitions:
            log_transition(saga_id, name, t.step, t.old, t.new, t.reason)

    @staticmethod
    def _log_ignored(record: SagaRecord, event: machine.Event, decision: Decision) -> None:
        step = getattr(event, "step", None)
        step_name = record.steps[step].name if step is not None else "-"
        logger.info(
            "saga %s %s: ignored %s (%s)",
            record.saga_id,
            step_name,
            type(event).__name__,
            decision.note,
            extra={
                "saga_id": record.saga_id,
                "saga": record.name,
                "step": step_name,
                "reason": decision.note,
            },
        )
