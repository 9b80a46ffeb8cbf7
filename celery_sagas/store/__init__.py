"""The SQLAlchemy store: tables, repository, migrations. The only package that imports it."""

from celery_sagas.store.engine import dispose_all_after_fork, shared_engine
from celery_sagas.store.migrate import upgrade
from celery_sagas.store.repository import SqlSagaStore

__all__ = ["SqlSagaStore", "dispose_all_after_fork", "shared_engine", "upgrade"]
