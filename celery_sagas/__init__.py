"""celery-sagas: durable sagas on Celery, with the database as the source of truth."""

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


def install(app, sagas, **settings):  # type: ignore[no-untyped-def]
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
