"""celery-sagas: durable sagas on Celery, with the database as the source of truth."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

# Declaring sagas
from celery_sagas.definition import RetryPolicy, Saga, Step, StepContext

# Errors
from celery_sagas.errors import (
    BusinessError,
    InvalidPayloadError,
    PayloadConflictError,
    SagaDefinitionError,
    SagaError,
    TransientError,
)

# States
from celery_sagas.machine import SagaState, StepStatus

# Wiring into Celery (imported lazily so declaring a saga needs no Celery import)
if TYPE_CHECKING:
    from celery import Celery

    from celery_sagas.integration import SagaRuntime


def install(app: Celery, sagas: Sequence[Saga], **settings: Any) -> SagaRuntime:
    """Wire ``sagas`` into the Celery ``app``; see ``celery_sagas.integration.install``."""
    from celery_sagas.integration import install as _install

    return _install(app, sagas, **settings)


__all__ = [
    "BusinessError",
    "InvalidPayloadError",
    "PayloadConflictError",
    "RetryPolicy",
    "Saga",
    "SagaDefinitionError",
    "SagaError",
    "SagaState",
    "Step",
    "StepContext",
    "StepStatus",
    "TransientError",
    "install",
]
