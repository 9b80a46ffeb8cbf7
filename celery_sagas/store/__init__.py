"""The SQLAlchemy store: tables, repository, migrations. The only package that imports it.

``SqlSagaStore(url_or_engine)`` is the store of that database: a ``PostgresSagaStore`` or
a ``SqliteSagaStore`` (both are imported here, so the constructor knows them).
"""

from celery_sagas.store.engine import dispose_all_after_fork, shared_engine
from celery_sagas.store.migrate import upgrade
from celery_sagas.store.postgres_store import PostgresSagaStore
from celery_sagas.store.repository import SqlSagaStore
from celery_sagas.store.sqlite_store import SqliteSagaStore

__all__ = [
    "PostgresSagaStore",
    "SqlSagaStore",
    "SqliteSagaStore",
    "dispose_all_after_fork",
    "shared_engine",
    "upgrade",
]
