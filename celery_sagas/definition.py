"""Declaring sagas: ``Saga`` and ``Step``, validated when they are declared.

A definition has no Celery app and no database; ``install(app, ...)`` wires it later.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery_sagas.errors import BusinessError, SagaDefinitionError, TransientError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
DEFAULT_STEP_TIMEOUT = 300.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: delay = min(cap, base * 2**(attempt-1)), then jitter.

    ``attempt`` counts attempts made so far (1 after the first failure). ``jitter``
    is the fraction of the delay that is randomised (1.0 = full jitter, 0 = none).
    """

    max_retries: int = 3
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise SagaDefinitionError("must be >= 0", field="retry.max_retries")
        if self.backoff_base <= 0:
            raise SagaDefinitionError("must be > 0", field="retry.backoff_base")
        if self.backoff_cap < self.backoff_base:
            raise SagaDefinitionError("must be >= backoff_base", field="retry.backoff_cap")
        if not 0 <= self.jitter <= 1:
            raise SagaDefinitionError("must be between 0 and 1", field="retry.jitter")

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait after failed attempt number ``attempt``; ``rand`` in [0, 1)."""
        raw = min(self.backoff_cap, self.backoff_base * 2.0 ** min(max(0, attempt - 1), 64))
        return raw * (1 - self.jitter) + raw * self.jitter * rand


@dataclass(frozen=True)
class StepContext:
    """What a step action or a compensation receives.

    ``idempotency_key`` is ``saga_id:step_name:action|compensation``: participants use it
    to dedupe their own side effects. ``results`` holds the results of the completed
    earlier steps by step name; ``result`` (compensations only) is this step's original
    result. ``attempt`` counts from 1.
    """

    saga_id: str
    saga: str
    step: str
    payload: Mapping[str, Any]
    results: Mapping[str, Any]
    idempotency_key: str
    attempt: int = 1
    result: Any = None


StepFunction = Callable[[StepContext], Any]


def _seconds(value: float | timedelta | None, field_name: str, saga: str | None) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise SagaDefinitionError(
            f"must be seconds or a timedelta, got {value!r}", field=field_name, saga=saga
        )
    if seconds <= 0:
        raise SagaDefinitionError(f"must be positive, got {value!r}", field=field_name, saga=saga)
    return float(seconds)


def _check_name(name: object, field_name: str, saga: str | None) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise SagaDefinitionError(
            f"must match {NAME_PATTERN.pattern}, got {name!r}", field=field_name, saga=saga
        )


def _error_types(value: Any, field_name: str) -> tuple[type[BaseException], ...]:
    types = tuple(value)
    for item in types:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise SagaDefinitionError(f"{item!r} is not an exception class", field=field_name)
    return types


def hook_task_name(target: Any) -> str | None:
    """The task name of an outcome hook: a name, a task (``.name``) or a signature
    (``["task"]``); None if ``target`` is none of these."""
    if isinstance(target, str):
        return target or None
    name = target.get("task") if isinstance(target, Mapping) else getattr(target, "name", None)
    return name if isinstance(name, str) and name else None


def _check_hook(target: Any, field_name: str, saga: str) -> None:
    if target is not None and hook_task_name(target) is None:
        raise SagaDefinitionError(
            f"must be a task, a task name or a signature, got {target!r}",
            field=field_name,
            saga=saga,
        )


@dataclass(frozen=True)
class Step:
    """One forward action and the compensation that undoes it.

    ``timeout`` (seconds or timedelta) bounds one attempt of the action. ``queue`` routes
    both the action and the compensation task. ``retry_on`` lists the exceptions worth
    retrying with ``retry``; ``business_errors`` mean "declined, did not act" (not
    compensated). Any other exception fails the step, which is then compensated too.
    """

    name: str
    action: StepFunction
    compensation: StepFunction
    timeout: float | timedelta | None = DEFAULT_STEP_TIMEOUT
    queue: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(max_retries=5))
    retry_on: Sequence[type[BaseException]] = (TransientError,)
    business_errors: Sequence[type[BaseException]] = (BusinessError,)
    compensation_name: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "name", None)
        where = f"steps[{self.name}]"
        if not callable(self.action):
            raise SagaDefinitionError(f"{self.action!r} is not callable", field=f"{where}.action")
        if self.compensation is None:
            raise SagaDefinitionError(
                "every step needs a compensation", field=f"{where}.compensation"
            )
        if not callable(self.compensation):
            raise SagaDefinitionError(
                f"{self.compensation!r} is not callable", field=f"{where}.compensation"
            )
        object.__setattr__(self, "timeout", _seconds(self.timeout, f"{where}.timeout", None))
        if self.queue is not None and (not isinstance(self.queue, str) or not self.queue):
            raise SagaDefinitionError("must be a non-empty string", field=f"{where}.queue")
        for name in ("retry", "compensation_retry"):
            if not isinstance(getattr(self, name), RetryPolicy):
                raise SagaDefinitionError("must be a RetryPolicy", field=f"{where}.{name}")
        object.__setattr__(self, "retry_on", _error_types(self.retry_on, f"{where}.retry_on"))
        object.__setattr__(
            self,
            "business_errors",
            _error_types(self.business_errors, f"{where}.business_errors"),
        )
        comp_name = self.compensation_name or getattr(self.compensation, "__name__", None)
        _check_name(comp_name, f"{where}.compensation_name", None)
        object.__setattr__(self, "compensation_name", comp_name)

    @property
    def timeout_seconds(self) -> float | None:
        return self.timeout  # type: ignore[return-value]


@dataclass(frozen=True)
class Saga:
    """An ordered list of steps. ``business_key`` maps a payload to its unique key
    (a field name or a function); ``validate`` raises ``InvalidPayloadError`` on bad input.
    ``on_completed`` / ``on_failed``: a task, a task name or a signature, sent once through
    the outbox when the saga becomes COMPLETED / FAILED (see ``celery_sagas.hooks``)."""

    name: str
    steps: Sequence[Step]
    business_key: str | Callable[[Mapping[str, Any]], str] = "id"
    validate: Callable[[Mapping[str, Any]], None] | None = None
    deadline: float | timedelta | None = None
    max_concurrent: int | None = None
    # a signature is a dict: kept out of eq/hash so a Saga stays hashable
    on_completed: Any = field(default=None, compare=False)
    on_failed: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name, "name", None)
        for hook in ("on_completed", "on_failed"):
            _check_hook(getattr(self, hook), hook, self.name)
        steps = tuple(self.steps)
        if not steps:
            raise SagaDefinitionError(
                "a saga needs at least one step", field="steps", saga=self.name
            )
        seen: dict[str, str] = {}
        for index, step in enumerate(steps):
            if not isinstance(step, Step):
                raise SagaDefinitionError(
                    f"{step!r} is not a Step", field=f"steps[{index}]", saga=self.name
                )
            for task_name, role in ((step.name, "name"), (step.compensation_name, "compensation")):
                assert task_name is not None
                if task_name in seen:
                    raise SagaDefinitionError(
                        f"duplicate task name {task_name!r} (already used by {seen[task_name]})",
                        field=f"steps[{index}].{role}",
                        saga=self.name,
                    )
                seen[task_name] = f"steps[{index}].{role}"
        object.__setattr__(self, "steps", steps)
        if not (isinstance(self.business_key, str) or callable(self.business_key)):
            raise SagaDefinitionError(
                "must be a field name or a function", field="business_key", saga=self.name
            )
        if self.validate is not None and not callable(self.validate):
            raise SagaDefinitionError("must be callable", field="validate", saga=self.name)
        object.__setattr__(self, "deadline", _seconds(self.deadline, "deadline", self.name))
        if self.max_concurrent is not None and (
            isinstance(self.max_concurrent, bool)
            or not isinstance(self.max_concurrent, int)
            or self.max_concurrent < 1
        ):
            raise SagaDefinitionError(
                f"must be a positive integer, got {self.max_concurrent!r}",
                field="max_concurrent",
                saga=self.name,
            )

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(step.name for step in self.steps)

    def key_for(self, payload: Mapping[str, Any]) -> str:
        if isinstance(self.business_key, str):
            return str(payload[self.business_key])
        return str(self.business_key(payload))

    def step_task_name(self, index: int) -> str:
        return f"{self.name}.{self.steps[index].name}"

    def compensation_task_name(self, index: int) -> str:
        return f"{self.name}.{self.steps[index].compensation_name}"


def idempotency_key(saga_id: str, step: str, role: str) -> str:
    """The guard key ``saga_id:step_name:action|compensation``."""
    return f"{saga_id}:{step}:{role}"


def registry(sagas: Sequence[Saga]) -> Mapping[str, Saga]:
    found: dict[str, Saga] = {}
    for saga in sagas:
        if saga.name in found:
            raise SagaDefinitionError("two sagas share this name", field="name", saga=saga.name)
        found[saga.name] = saga
    return found
