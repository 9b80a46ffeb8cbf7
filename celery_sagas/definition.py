"""Declaring sagas: ``Saga`` and ``Step``, validated when they are declared.

A definition has no Celery app and no database; ``install(app, ...)`` wires it later.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import cached_property
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

    ``timeout`` (seconds or timedelta, default 300 s) bounds one attempt of the action: a
    step still running then is timed out and compensated. ``queue`` routes both the action
    and the compensation task. ``retry_on`` lists the exceptions worth
    retrying with ``retry``; ``business_errors`` mean "declined, did not act" (not
    compensated). Connection-level errors (a database or broker connection lost:
    ``ConnectionError``, ``TimeoutError``, a driver's ``OperationalError`` or
    ``InterfaceError``) are retried too, with ``connection_retry`` (8 retries backing off to
    30 s: about two minutes), unless ``retry_connection_errors=False``. Any other
    exception fails the step, which is then compensated too.
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
    retry_connection_errors: bool = True
    # a database or broker restart takes longer than a busy participant's hiccup
    connection_retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(max_retries=8, backoff_cap=30.0)
    )
    # True when compensation_name was taken from the function (the saga may rename it)
    derived_compensation_name: bool = field(default=False, init=False, repr=False, compare=False)

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
        for name in ("retry", "compensation_retry", "connection_retry"):
            if not isinstance(getattr(self, name), RetryPolicy):
                raise SagaDefinitionError("must be a RetryPolicy", field=f"{where}.{name}")
        object.__setattr__(self, "retry_on", _error_types(self.retry_on, f"{where}.retry_on"))
        object.__setattr__(
            self,
            "business_errors",
            _error_types(self.business_errors, f"{where}.business_errors"),
        )
        if self.compensation_name is None:
            function_name = getattr(self.compensation, "__name__", None)
            usable = isinstance(function_name, str) and NAME_PATTERN.match(function_name)
            object.__setattr__(
                self, "compensation_name", function_name if usable else undo_name(self.name)
            )
            object.__setattr__(self, "derived_compensation_name", True)
        _check_name(self.compensation_name, f"{where}.compensation_name", None)

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
    version: int | None = None
    # a signature is a dict: kept out of eq/hash so a Saga stays hashable
    on_completed: Any = field(default=None, compare=False)
    on_failed: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name, "name", None)
        for hook in HOOK_NAMES:
            _check_hook(getattr(self, hook), hook, self.name)
        steps = tuple(self.steps)
        if not steps:
            raise SagaDefinitionError(
                "a saga needs at least one step", field="steps", saga=self.name
            )
        for index, step in enumerate(steps):
            if not isinstance(step, Step):
                raise SagaDefinitionError(
                    f"{step!r} is not a Step", field=f"steps[{index}]", saga=self.name
                )
        steps = _unshared_compensation_names(steps)
        seen: dict[str, str] = {}
        for index, step in enumerate(steps):
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
        if self.version is not None and (
            isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1
        ):
            raise SagaDefinitionError(
                f"must be a positive integer, got {self.version!r}", field="version", saga=self.name
            )

    @cached_property
    def fingerprint(self) -> str:
        """What a saga records of the definition it started with: its name, explicit
        version, and its steps and compensations in order (16 hex digits)."""
        shape = [self.name, self.version, [[s.name, s.compensation_name] for s in self.steps]]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]

    @property
    def task_prefix(self) -> str:
        """``name``, or ``name.vN`` for an explicit version (installed side by side)."""
        return self.name if self.version is None else f"{self.name}.v{self.version}"

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(step.name for step in self.steps)

    def key_for(self, payload: Mapping[str, Any]) -> str:
        if isinstance(self.business_key, str):
            return str(payload[self.business_key])
        return str(self.business_key(payload))

    def step_task_name(self, index: int) -> str:
        return f"{self.task_prefix}.{self.steps[index].name}"

    def compensation_task_name(self, index: int) -> str:
        return f"{self.task_prefix}.{self.steps[index].compensation_name}"


def undo_name(step_name: str) -> str:
    """The compensation name of a step whose compensation function gives none."""
    return f"undo_{step_name}"


def _unshared_compensation_names(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """A compensation name taken from a function that serves several steps (or that names
    a step) becomes ``undo_<step>``: task names come from the step then."""
    names = [step.name for step in steps] + [str(step.compensation_name) for step in steps]
    return tuple(
        replace(step, compensation_name=undo_name(step.name))
        if step.derived_compensation_name and names.count(str(step.compensation_name)) > 1
        else step
        for step in steps
    )


def idempotency_key(saga_id: str, step: str, role: str) -> str:
    """The guard key ``saga_id:step_name:action|compensation``."""
    return f"{saga_id}:{step}:{role}"


HOOK_NAMES = ("on_completed", "on_failed")
HOOK_ROLE = "hook"


def hook_key(saga_id: str, hook: str) -> str:
    """The run-once key of a saga's hook (shaped like a step guard key)."""
    return idempotency_key(saga_id, hook, HOOK_ROLE)


def guard_keys(saga_id: str, step_names: Iterable[str]) -> set[str]:
    """Every guard key a saga with these steps can have written: each step's action and
    compensation, and its hooks' run-once claims (what retention deletes)."""
    keys = {hook_key(saga_id, hook) for hook in HOOK_NAMES}
    for name in step_names:
        keys |= {idempotency_key(saga_id, name, role) for role in ("action", "compensation")}
    return keys


class SagaRegistry(dict[str, Saga]):
    """Installed sagas by name (the newest version of each: what new starts use), and
    every installed version by ``fingerprint`` (what in-flight sagas finish on)."""

    def __init__(self, sagas: Sequence[Saga]) -> None:
        super().__init__()
        self.versions: dict[str, Saga] = {}
        for saga in sagas:
            if saga.fingerprint in self.versions:
                raise SagaDefinitionError(
                    "this saga (name, version and steps) is installed twice",
                    field="name",
                    saga=saga.name,
                )
            newest = self.get(saga.name)
            if newest is not None and (newest.version or 0) == (saga.version or 0):
                raise SagaDefinitionError(
                    "two sagas share this name: give each a different version=",
                    field="version",
                    saga=saga.name,
                )
            self.versions[saga.fingerprint] = saga
            if newest is None or (saga.version or 0) > (newest.version or 0):
                self[saga.name] = saga

    def for_fingerprint(self, name: str, fingerprint: str | None) -> Saga | None:
        """The installed definition a saga started with (None: not installed here). A saga
        recorded before definitions were fingerprinted runs on its name's newest."""
        if fingerprint is None:
            return self.get(name)
        return self.versions.get(fingerprint)


def registry(sagas: Sequence[Saga]) -> SagaRegistry:
    return SagaRegistry(sagas)
