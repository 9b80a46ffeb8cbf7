"""celery-sagas: durable sagas on Celery, with the database as the source of truth."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

# Declaring sagas (orchestrated, and choreographed)
from celery_sagas.choreography import Choreography
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
    from celery_sagas.integration.choreography import ChoreographySubscriber


def install(app: Celery, sagas: Sequence[Saga], **settings: Any) -> SagaRuntime:
    """Wire ``sagas`` into the Celery ``app``; see ``celery_sagas.integration.install``."""
    from celery_sagas.integration import install as _install

    return _install(app, sagas, **settings)


def choreography_subscriber(
    app: Celery, choreography: Choreography, **settings: Any
) -> ChoreographySubscriber:
    """Wire a choreography into the Celery ``app``; returns the handler decorator (see
    ``celery_sagas.integration.choreography``)."""
    from celery_sagas.integration.choreography import choreography_subscriber as _subscribe

    return _subscribe(app, choreography, **settings)


__all__ = [
    "BusinessError",
    "Choreography",
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
    "choreography_subscriber",
    "install",
]
