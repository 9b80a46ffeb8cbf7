"""Celery glue: ``install(app, sagas)`` and the thin tasks. Only this package and the CLI
import Celery."""

from celery_sagas.integration.runtime import SagaRuntime, install

__all__ = ["SagaRuntime", "install"]
